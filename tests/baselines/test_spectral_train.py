"""The spectral baseline end to end on the bundled sample (random backbone, 28 px): fit, export (the eigendecomposition
inside the program), the segments figure, and the one-sentence errors for settings the data cannot support."""

import json
from pathlib import Path

import pytest
import torch

from baselines.spectral.config import SpectralConfig
from baselines.spectral.train import check_settings, main, patch_colours
from shared.config import load_config
from shared.segmenter import load

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "baselines" / "spectral" / "configs" / "tiny.yaml"
SMALL = ["resolution=28", "val_resolution=28"]  # 2x2 patches


def _config(root: Path, cache: Path, *extra: str) -> SpectralConfig:
    return load_config(SpectralConfig, TINY, [f"output_root={root / 'runs'}", f"cache_dir={cache}", *SMALL,
                                              "n_segments=3", "n_eigenvectors=3", *extra])


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectral_e2e")
    cache = tmp_path_factory.getbasetemp() / "uss_feature_cache"  # shared with the other methods' e2e tests
    return root, cache, main(_config(root, cache, "colour_weight=0.5"))


def test_tiny_fit_writes_an_export_that_equals_the_head(tiny_fit):
    root, _, finished = tiny_fit
    run_dir = root / "runs" / "spectral" / "camvid_sample" / "tiny"
    for name in ("config.yaml", "final_metrics.json", "export/segmenter.pt2", "figures/predictions.png",
                 "figures/segments.png"):
        assert (run_dir / name).is_file(), name
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["n_segments_found"] + final["n_empty_segments"] == 40 * 3  # 40 training images, 3 segments each
    segmenter = load(finished.export_path)
    meta = segmenter.metadata
    assert (meta["method"], meta["n_clusters"], meta["code_dim"], meta["n_segments"]) == ("spectral", 11, 384, 3)
    features = torch.randn(2, 384, 5, 7)
    with torch.no_grad():
        ours, theirs = finished.head(features), segmenter(features)
    for key in ("code", "cluster_logits"):
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-5)
    # Each token's code is its segment's descriptor: at most n_segments distinct codes per image.
    assert all(len(torch.unique(theirs["code"][b].flatten(1).T, dim=0)) <= 3 for b in range(2))


def test_patch_colours_are_the_mean_rgb_of_each_patch():
    image = torch.zeros(3, 4, 4)
    image[0, :2, :2] = 10.0  # far above the normalised range: red saturates to 1 in the top-left patch
    colours = patch_colours([{"image": image}], [0], patch=2)
    assert colours.shape == (1, 3, 2, 2)
    assert float(colours[0, 0, 0, 0]) == pytest.approx(1.0) and float(colours[0, 0, 1, 1]) < 0.6


def test_more_segments_than_tokens_of_a_tiny_run(tiny_fit):
    root, cache, _ = tiny_fit
    with pytest.raises(ValueError, match=r"n_segments=5 but each image has 2x2 = 4 tokens .* raise the resolution"):
        main(_config(root, cache, "name=crowded", "n_segments=5"))


def test_fewer_images_than_clusters_and_other_bad_settings():
    cfg = SpectralConfig(n_segments=4, n_eigenvectors=4, resolution=56)
    with pytest.raises(ValueError, match="has 9 images, fewer than n_clusters=11"):
        check_settings(cfg, 9, (4, 4), 11)
    check_settings(cfg, 40, (4, 4), 11)
    with pytest.raises(ValueError, match="n_eigenvectors=20 but each image has only 16 tokens"):
        check_settings(SpectralConfig(n_segments=4, n_eigenvectors=20), 40, (4, 4), 11)
