"""The crafted files of conftest.py are live: an unrestricted load runs their payload (so a reader that leaves no
marker really refused it, rather than meeting a harmless file)."""

import pickle

import torch


def test_an_unrestricted_load_runs_the_payload(crafted_file):
    crafted = crafted_file()
    if crafted.format == "raw-pickle":
        pickle.loads(crafted.path.read_bytes())
    else:
        loaded = torch.load(crafted.path, weights_only=False)
        torch.testing.assert_close(loaded["w"], torch.ones(3))  # the payload leaves the rest of the file loadable
    assert crafted.marker.exists()
