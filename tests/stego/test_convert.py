"""Official STEGO checkpoint -> exported segmenter: outputs match the original formula, errors are clear."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from shared.segmenter import load
from stego.convert import convert, main

C, D, K, EXTRA = 384, 7, 5, 1  # dino_vits8 features


def official_state(nonlinear=True):
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen) * 0.1  # noqa: E731
    state = {"net.cluster1.0.weight": rand(D, C, 1, 1), "net.cluster1.0.bias": rand(D),
             "cluster_probe.clusters": rand(K + EXTRA, D), "train_cluster_probe.clusters": rand(K, D),
             "linear_probe.weight": rand(K, D, 1, 1), "linear_probe.bias": rand(K),
             "decoder.weight": rand(C, D, 1, 1), "net.model.cls_token": rand(1, 1, C)}
    if nonlinear:
        state |= {"net.cluster2.0.weight": rand(C, C, 1, 1), "net.cluster2.0.bias": rand(C),
                  "net.cluster2.2.weight": rand(D, C, 1, 1), "net.cluster2.2.bias": rand(D)}
    return state


def save_lightning_ckpt(path, state):
    """A Lightning-style checkpoint whose hyper-parameters pickle a class from a package we do not have."""
    fake = types.ModuleType("fake_omegaconf")

    class DictConfig:
        def __init__(self, content):
            self.content = content

    DictConfig.__module__, DictConfig.__qualname__ = "fake_omegaconf", "DictConfig"
    fake.DictConfig = DictConfig
    sys.modules["fake_omegaconf"] = fake
    try:
        torch.save({"state_dict": state, "epoch": 3, "global_step": 7000,
                    "hyper_parameters": {"n_classes": K, "cfg": DictConfig({"dim": D})}}, path)
    finally:
        del sys.modules["fake_omegaconf"]


def reference_outputs(state, feats, alpha=2.0):
    """The original LitUnsupervisedSegmenter at evaluation, written with functional ops."""
    code = F.conv2d(feats, state["net.cluster1.0.weight"], state["net.cluster1.0.bias"])
    if "net.cluster2.0.weight" in state:
        hidden = F.relu(F.conv2d(feats, state["net.cluster2.0.weight"], state["net.cluster2.0.bias"]))
        code = code + F.conv2d(hidden, state["net.cluster2.2.weight"], state["net.cluster2.2.bias"])
    inner = torch.einsum("bchw,nc->bnhw", F.normalize(code, dim=1), F.normalize(state["cluster_probe.clusters"], dim=1))
    linear = F.conv2d(code, state["linear_probe.weight"], state["linear_probe.bias"])
    return code, alpha * inner, linear


@pytest.mark.parametrize("nonlinear", [True, False])
def test_converted_segmenter_matches_the_official_head(tmp_path, nonlinear):
    state = official_state(nonlinear)
    save_lightning_ckpt(tmp_path / "official.ckpt", state)
    out = convert(tmp_path / "official.ckpt", tmp_path / "export" / "segmenter.pt", backbone="dino_vits8",
                  dataset="cocostuff27", weights_id="sha256-test")
    segmenter = load(out)
    feats = torch.randn(2, C, 4, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = segmenter(feats)
    code, cluster_logits, linear_logits = reference_outputs(state, feats)
    torch.testing.assert_close(ours["code"], code, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["cluster_logits"], cluster_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["linear_logits"], linear_logits, rtol=1e-5, atol=1e-5)
    meta = segmenter.metadata
    assert (meta["backbone"], meta["backbone_weights_id"], meta["n_classes"], meta["n_clusters"], meta["code_dim"]) \
        == ("dino_vits8", "sha256-test", K, K + EXTRA, D)


class _RunsCode:
    """Unpickling this calls builtins.exec, as a crafted checkpoint would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_pickled_callable_is_not_run(tmp_path):
    marker = tmp_path / "ran.txt"
    state = official_state()
    # Protocol 4 names the module `builtins` (protocol 2 writes `__builtin__`).
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": _RunsCode(marker)}}, tmp_path / "crafted.ckpt",
               pickle_protocol=4)
    out = convert(tmp_path / "crafted.ckpt", tmp_path / "seg.pt", backbone="dino_vits8", weights_id="x")
    assert not marker.exists()
    torch.testing.assert_close(load(out).centres, state["cluster_probe.clusters"])


def test_bare_state_dict_and_cli(tmp_path, capsys):
    torch.save(official_state(), tmp_path / "bare.pt")  # weights_only-loadable
    main([str(tmp_path / "bare.pt"), str(tmp_path / "seg.pt"), "--backbone", "dino_vits8", "--weights-id", "x"])
    assert "wrote" in capsys.readouterr().out
    assert load(tmp_path / "seg.pt").metadata["method"] == "stego"


def test_missing_keys_and_wrong_backbone_are_clear_errors(tmp_path):
    state = official_state()
    del state["cluster_probe.clusters"]
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(KeyError, match="cluster_probe.clusters"):
        convert(tmp_path / "broken.ckpt", tmp_path / "a.pt", backbone="dino_vits8", weights_id="x")
    torch.save({"state_dict": official_state()}, tmp_path / "ok.ckpt")
    with pytest.raises(ValueError, match="384-channel features but dino_vitb8 gives 768"):
        convert(tmp_path / "ok.ckpt", tmp_path / "b.pt", backbone="dino_vitb8", weights_id="x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nope.ckpt", tmp_path / "c.pt", backbone="dino_vits8")
