"""Segmenter export / load round trip against the modules it was built from, and clear errors for bad files."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.probes import ClusterProbe, LinearProbe
from shared.segmenter import Segmenter, SegmenterFormatError, load, save_segmenter

DIM, CODE, K, EXTRA = 8, 4, 3, 1


class StegoLikeHead(nn.Module):
    """Linear branch + nonlinear branch (conv, relu, conv), summed, like STEGO's projection head."""

    def __init__(self) -> None:
        super().__init__()
        self.cluster1 = nn.Conv2d(DIM, CODE, 1)
        self.cluster2 = nn.Sequential(nn.Conv2d(DIM, DIM, 1), nn.ReLU(), nn.Conv2d(DIM, CODE, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cluster1(x) + self.cluster2(x)


def metadata(**over) -> dict:
    meta = dict(method="stego", backbone="dino_vits8", backbone_weights_id="random-seed0", pretrained_backbone=False,
                feature_layer=-1, resolution=224, n_classes=K, n_clusters=K + EXTRA, code_dim=CODE,
                dataset="camvid_sample", probabilistic=False)
    meta.update(over)
    return meta


def export_stego(path, alpha=2.0):
    torch.manual_seed(0)
    head, cluster, linear = StegoLikeHead(), ClusterProbe(CODE, K, EXTRA), LinearProbe(CODE, K)
    branches = [
        [{"op": "conv1x1", "weight": "cluster1.weight", "bias": "cluster1.bias"}],
        [{"op": "conv1x1", "weight": "cluster2.0.weight", "bias": "cluster2.0.bias"}, {"op": "relu"},
         {"op": "conv1x1", "weight": "cluster2.2.weight", "bias": "cluster2.2.bias"}],
    ]
    save_segmenter(path, code_branches=branches, state_dict=head.state_dict(), cluster_centres=cluster.centres,
                   alpha=alpha, linear_weight=linear.conv.weight, linear_bias=linear.conv.bias, metadata=metadata())
    return head, cluster, linear


def test_round_trip_equals_source_modules(tmp_path):
    path = tmp_path / "export" / "segmenter.pt"
    head, cluster, linear = export_stego(path, alpha=4.0)
    seg = load(path)
    assert isinstance(seg, Segmenter) and not seg.training
    assert seg.metadata["method"] == "stego" and seg.metadata["n_clusters"] == K + EXTRA
    x = torch.randn(2, DIM, 5, 6)
    out = seg(x)
    code = head(x)
    _, cluster_logits = cluster(code, alpha=4.0)
    assert torch.allclose(out["code"], code, atol=1e-6)
    assert torch.allclose(out["cluster_logits"], cluster_logits, atol=1e-6)
    assert torch.allclose(out["linear_logits"], linear(code), atol=1e-6)
    assert not list(tmp_path.glob("export/*.tmp"))  # atomic write left no temporary file


def test_other_ops_and_no_linear(tmp_path):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(DIM).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    conv = nn.Conv2d(DIM, CODE, 1, bias=False)
    state = {"bn.weight": bn.weight, "bn.bias": bn.bias, "bn.mean": bn.running_mean, "bn.var": bn.running_var,
             "conv.weight": conv.weight[:, :, 0, 0]}
    branches = [[{"op": "batchnorm", "weight": "bn.weight", "bias": "bn.bias", "running_mean": "bn.mean",
                  "running_var": "bn.var", "eps": 1e-5}, {"op": "silu"},
                 {"op": "conv1x1", "weight": "conv.weight", "bias": None}, {"op": "l2norm"}],
                [{"op": "identity"}, {"op": "conv1x1", "weight": "conv.weight", "bias": None}]]
    centres = torch.randn(K, CODE)
    save_segmenter(tmp_path / "s.pt", code_branches=branches, state_dict=state, cluster_centres=centres, alpha=2.0,
                   metadata=metadata(n_clusters=K))
    seg = load(tmp_path / "s.pt")
    x = torch.randn(1, DIM, 3, 3)
    with torch.no_grad():
        code = F.normalize(conv(F.silu(bn(x))), dim=1) + conv(x)
    out = seg(x)
    assert torch.allclose(out["code"], code, atol=1e-5)
    assert out["linear_logits"] is None
    ref = 2.0 * torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(centres, dim=1))
    assert torch.allclose(out["cluster_logits"], ref, atol=1e-5)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load(tmp_path / "missing.pt")
    path = tmp_path / "s.pt"
    export_stego(path)
    good = torch.load(path, weights_only=True)

    def write(blob):
        torch.save(blob, path)

    write({**good, "version": 99})
    with pytest.raises(SegmenterFormatError, match="version 99"):
        load(path)
    write({**good, "head": {**good["head"], "code_branches": [[{"op": "gelu"}]]}})
    with pytest.raises(SegmenterFormatError, match="unknown op 'gelu'"):
        load(path)
    write({**good, "state_dict": {k: v for k, v in good["state_dict"].items() if k != "cluster1.bias"}})
    with pytest.raises(SegmenterFormatError, match="'cluster1.bias'"):
        load(path)
    write({**good, "metadata": {k: v for k, v in good["metadata"].items() if k != "code_dim"}})
    with pytest.raises(SegmenterFormatError, match="code_dim"):
        load(path)
    write({**good, "head": {**good["head"], "variance": []}})
    with pytest.raises(SegmenterFormatError, match="variance"):
        load(path)
    write({**good, "metadata": {**good["metadata"], "n_clusters": K}})  # the centres hold K + EXTRA rows
    with pytest.raises(SegmenterFormatError, match=r"cluster\.centres.*\(4, 4\).*\(3, 4\)"):
        load(path)
    write({**good, "metadata": {**good["metadata"], "code_dim": CODE + 1}})
    with pytest.raises(SegmenterFormatError, match=r"code_dim"):
        load(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(SegmenterFormatError, match=str(path.name)):
        load(path)
    with pytest.raises(SegmenterFormatError, match="metadata lacks"):
        save_segmenter(tmp_path / "x.pt", code_branches=[[{"op": "identity"}]], state_dict={},
                       cluster_centres=torch.randn(K, DIM), alpha=2.0, metadata={"method": "x"})
    with pytest.raises(SegmenterFormatError, match=r"linear\.weight.*\(2, 4, 1, 1\).*\(3, 4, 1, 1\)"):
        save_segmenter(tmp_path / "x.pt", code_branches=[[{"op": "identity"}]], state_dict={},
                       cluster_centres=torch.randn(K + EXTRA, CODE), alpha=2.0, linear_weight=torch.randn(2, CODE),
                       metadata=metadata())
    assert not (tmp_path / "x.pt").exists()
