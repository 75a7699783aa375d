"""Official STEGO checkpoint -> exported segmenter: outputs match the original formula, errors are clear, and a
crafted checkpoint runs no code."""

import collections
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.cli import run_cli
from shared.segmenter import load
from stego.convert import UnsafeCheckpointError, convert, main

REPO = Path(__file__).resolve().parents[2]
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


def fake_class(module, name, base=object):
    """A class that pickles as `module.name`, for packages that are not installed here."""
    cls = type(name, (base,), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


FAKE_MODULES = {
    "omegaconf.dictconfig": fake_class("omegaconf.dictconfig", "DictConfig"),
    "pytorch_lightning.utilities.parsing": fake_class("pytorch_lightning.utilities.parsing", "AttributeDict", dict),
    "pytorch_lightning.callbacks.model_checkpoint": fake_class("pytorch_lightning.callbacks.model_checkpoint",
                                                               "ModelCheckpoint"),
}


def save_lightning_ckpt(path, state, legacy=False, **extra_hparams):
    """A Lightning-style checkpoint: its hyper-parameters and callback state pickle classes of packages we do not
    have (AttributeDict, an OmegaConf DictConfig, the ModelCheckpoint class as a key) and the typing.Any, defaultdict
    and numpy values that OmegaConf and Lightning store."""
    names = {".".join(module.split(".")[: i + 1]) for module in FAKE_MODULES for i in range(module.count(".") + 1)}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for module, cls in FAKE_MODULES.items():
        setattr(sys.modules[module], cls.__qualname__, cls)
    cfg = FAKE_MODULES["omegaconf.dictconfig"]()
    cfg.__dict__.update(_content={"dim": D}, _metadata={"ref_type": typing.Any, "object_type": dict},
                        _resolver_cache=collections.defaultdict(dict), lr=np.float64(5e-4), mean=np.zeros(3))
    hparams = FAKE_MODULES["pytorch_lightning.utilities.parsing"](n_classes=K, cfg=cfg, **extra_hparams)
    callbacks = {FAKE_MODULES["pytorch_lightning.callbacks.model_checkpoint"]: {"best_model_score": torch.tensor(.5)}}
    try:
        checkpoint = {"state_dict": state, "epoch": 3, "global_step": 7000, "pytorch-lightning_version": "1.4.9",
                      "callbacks": callbacks, "hyper_parameters": hparams}
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for name in names:
            del sys.modules[name]


def reference_outputs(state, feats, alpha=2.0):
    """The original LitUnsupervisedSegmenter at evaluation, written with functional ops."""
    code = F.conv2d(feats, state["net.cluster1.0.weight"], state["net.cluster1.0.bias"])
    if "net.cluster2.0.weight" in state:
        hidden = F.relu(F.conv2d(feats, state["net.cluster2.0.weight"], state["net.cluster2.0.bias"]))
        code = code + F.conv2d(hidden, state["net.cluster2.2.weight"], state["net.cluster2.2.bias"])
    inner = torch.einsum("bchw,nc->bnhw", F.normalize(code, dim=1), F.normalize(state["cluster_probe.clusters"], dim=1))
    linear = F.conv2d(code, state["linear_probe.weight"], state["linear_probe.bias"])
    return code, alpha * inner, linear


@pytest.mark.parametrize("nonlinear, legacy", [(True, False), (False, False), (True, True)])
def test_converted_segmenter_matches_the_official_head(tmp_path, nonlinear, legacy):
    state = official_state(nonlinear)
    save_lightning_ckpt(tmp_path / "official.ckpt", state, legacy=legacy)
    out = convert(tmp_path / "official.ckpt", tmp_path / "export" / "segmenter.pt2", backbone="dino_vits8",
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


def assert_refused(error, path, refused):
    """The error is one line that names the file and what it refused."""
    message = str(error.args[0])
    assert str(path) in message and refused in message and "\n" not in message


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickled_callable_beside_valid_weights_is_refused(tmp_path, legacy):
    marker = tmp_path / "ran.txt"
    save_lightning_ckpt(tmp_path / "crafted.ckpt", official_state(), legacy=legacy, extra=_RunsCode(marker))
    with pytest.raises(UnsafeCheckpointError) as error:
        convert(tmp_path / "crafted.ckpt", tmp_path / "seg.pt", backbone="dino_vits8", weights_id="x")
    assert_refused(error.value, tmp_path / "crafted.ckpt", "__builtin__.exec")
    assert not marker.exists() and not (tmp_path / "seg.pt").exists()


def test_a_crafted_file_runs_nothing_and_the_cli_exits_with_one_line(tmp_path, crafted_file, capsys):
    crafted = crafted_file("crafted.ckpt", {"state_dict": official_state(), "epoch": 3})
    with pytest.raises(UnsafeCheckpointError) as error:
        convert(crafted.path, tmp_path / "seg.pt", backbone="dino_vits8", weights_id="x")
    assert_refused(error.value, crafted.path, "__builtin__.")  # getattr (for Path.touch) or eval
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(crafted.path), str(tmp_path / "seg.pt"), "--backbone", "dino_vits8", "--weights-id", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: STEGO checkpoint {crafted.path} pickles __builtin__.")
    assert not crafted.marker.exists() and not (tmp_path / "seg.pt").exists()


@pytest.mark.parametrize("crafted_file", ["legacy-magic"], indirect=True)
def test_cli_process_exits_non_zero_on_a_legacy_file_whose_magic_number_is_a_payload(tmp_path, crafted_file):
    crafted = crafted_file("crafted.ckpt", {"state_dict": official_state()})
    done = subprocess.run([sys.executable, "-m", "stego.convert", str(crafted.path), str(tmp_path / "seg.pt"),
                           "--backbone", "dino_vits8", "--weights-id", "x"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith(f"error: STEGO checkpoint {crafted.path} pickles")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not crafted.marker.exists() and not (tmp_path / "seg.pt").exists()


def test_bare_state_dict_and_cli(tmp_path, capsys):
    torch.save(official_state(), tmp_path / "bare.pt")  # weights_only-loadable
    main([str(tmp_path / "bare.pt"), str(tmp_path / "seg.pt"), "--backbone", "dino_vits8", "--weights-id", "x"])
    assert "wrote" in capsys.readouterr().out
    assert load(tmp_path / "seg.pt").metadata["method"] == "stego"


def test_missing_keys_and_wrong_backbone_are_clear_errors(tmp_path, capsys):
    state = official_state()
    del state["cluster_probe.clusters"]
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="cluster_probe.clusters"):
        convert(tmp_path / "broken.ckpt", tmp_path / "a.pt", backbone="dino_vits8", weights_id="x")
    torch.save({"state_dict": official_state()}, tmp_path / "ok.ckpt")
    with pytest.raises(ValueError, match="384-channel features but dino_vitb8 gives 768"):
        convert(tmp_path / "ok.ckpt", tmp_path / "b.pt", backbone="dino_vitb8", weights_id="x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nope.ckpt", tmp_path / "c.pt", backbone="dino_vits8")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "ok.ckpt").read_bytes()[:500])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(tmp_path / "cut.ckpt"), str(tmp_path / "d.pt"), "--backbone", "dino_vits8", "--weights-id",
                       "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.match(r"^error: STEGO checkpoint .*cut.ckpt is not a readable PyTorch file", err), err
    assert len(err.strip().splitlines()) == 1
