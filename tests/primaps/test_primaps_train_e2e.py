"""End to end on the bundled sample with a random backbone: the tiny config "+SotA" on a synthetic exported base
segmenter (export reloads and equals the head, its code is the base's), a base over another backbone is refused,
and (slow) a run stopped after one step and resumed equals an uninterrupted one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from shared.features import DEFAULT_DESCRIPTOR, canonical_descriptor
from shared.run_dir import RunDirError
from shared.segmenter import load, save

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "primaps" / "configs" / "tiny.yaml"
SMALL = ["resolution=28", "val_resolution=28"]


class ToyBase(nn.Module):
    """A stand-in for an exported STEGO head: a 1x1 conv code and cosine clusters."""

    def __init__(self, dim=384, code=12, k=11):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Conv2d(dim, code, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(code, dim, 1, 1, generator=gen) * 0.1)
            self.proj.bias.zero_()
        self.centres = nn.Parameter(torch.randn(k, code, generator=gen))

    def forward(self, features):
        code = self.proj(features)
        return {"code": code, "cluster_logits": torch.einsum("bdhw,kd->bkhw", code, self.centres)}


def export_base(path, backbone="dinov2_vits14", weights_id="random-seed0"):
    meta = {"method": "toy", "backbone": backbone, "backbone_weights_id": weights_id, "pretrained_backbone": False,
            "features": canonical_descriptor(DEFAULT_DESCRIPTOR), "resolution": 28, "n_classes": 11,
            "n_clusters": 11, "code_dim": 12, "dataset": "camvid_sample", "probabilistic": False,
            "selected_by": "last"}
    return save(path, ToyBase(), torch.randn(2, 384, 3, 4), meta)


def run_tiny(root, cache, *extra):
    cmd = [sys.executable, "-m", "primaps.train", "--config", str(TINY), f"output_root={root}", f"cache_dir={cache}",
           "device=cpu", *SMALL, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "uss_feature_cache"


def test_tiny_run_on_a_base_segmenter(tmp_path, cache):
    base = export_base(tmp_path / "base" / "segmenter.pt2")
    done = run_tiny(tmp_path / "runs", cache, f"base_segmenter={base}", "name=plus")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "primaps" / "camvid_sample" / "plus"
    for name in ("export/segmenter.pt2", "final_metrics.json", "figures/pseudo_masks.png", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    exported, toy = load(run_dir / "export" / "segmenter.pt2"), ToyBase()
    assert exported.metadata["code_dim"] == 12 and exported.metadata["base_sha256"]
    feats = torch.randn(2, 384, 5, 7)
    with torch.no_grad():
        assert torch.allclose(exported(feats)["code"], toy(feats)["code"], atol=1e-5)  # the EM ran on the base code


def test_a_base_over_another_backbone_is_refused(tmp_path):
    from primaps.config import PrimapsConfig
    from primaps.data import _base
    from shared.backbone import build_backbone

    base = export_base(tmp_path / "segmenter.pt2", backbone="dino_vits8")
    cfg = PrimapsConfig(base_segmenter=str(base))
    with pytest.raises(RunDirError, match="dino_vits8"):
        _base(cfg, build_backbone("dinov2_vits14", "none"), 11, "cpu")


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, cache):
    assert run_tiny(tmp_path / "a", cache, "name=full").returncode == 0
    assert run_tiny(tmp_path / "b", cache, "name=cut", "max_steps=1").returncode == 0
    resumed = run_tiny(tmp_path / "b", cache, "name=cut", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = load(tmp_path / "a" / "primaps" / "camvid_sample" / "full" / "export" / "segmenter.pt2")
    cut = load(tmp_path / "b" / "primaps" / "camvid_sample" / "cut" / "export" / "segmenter.pt2")
    feats = torch.randn(2, 384, 5, 7)
    with torch.no_grad():
        a, b = full(feats), cut(feats)
    assert all(torch.equal(a[k], b[k]) for k in a)
