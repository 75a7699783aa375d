"""Dataset preparation CLIs: `python -m shared.data.prepare <cocostuff|cityscapes|potsdam|camvid|five_crop|knn>`."""
