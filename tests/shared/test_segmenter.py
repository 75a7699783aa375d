"""Exported segmenters: torch.export programs with metadata, checked on save and on load, loaded without running
any code from the file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.segmenter import FORMAT, VERSION, SegmenterFormatError, load, read_metadata, save

C, D, K, EXTRA = 12, 6, 4, 1


class ToyHead(nn.Module):
    """A small head of the contract: two conv branches, cosine clusters, a linear probe, optional variance."""

    def __init__(self, variance: bool = False, outputs: dict | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(C, D, 1), nn.Sequential(nn.Conv2d(C, C, 1), nn.ReLU(), nn.Conv2d(C, D, 1))
        self.centres = nn.Parameter(torch.randn(K + EXTRA, D))
        self.linear = nn.Conv2d(D, K, 1)
        self.variance = variance
        self.override = outputs or {}

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        code = self.a(features) + self.b(features)
        inner = torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(self.centres, dim=1))
        out = {"code": code, "cluster_logits": 2 * inner, "linear_logits": self.linear(code)}
        if self.variance:
            out["variance"] = code.pow(2).mean(1)
        for key, fn in self.override.items():
            if fn is None:
                out.pop(key)
            else:
                out[key] = fn(out)
        return out


def metadata(**changes) -> dict:
    meta = {"method": "toy", "backbone": "dinov2_vits14", "backbone_weights_id": "random", "pretrained_backbone": False,
            "features": {"kind": "tokens", "layer": -1}, "resolution": 56, "n_classes": K, "n_clusters": K + EXTRA,
            "code_dim": D, "dataset": "camvid_sample", "probabilistic": False, "selected_by": "last"}
    meta.update(changes)
    return meta


def example() -> torch.Tensor:
    return torch.randn(2, C, 4, 5, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, ToyHead]:
    path = tmp_path_factory.mktemp("seg") / "export" / "segmenter.pt2"
    head = ToyHead(variance=True).eval()
    save(path, head, example(), metadata(probabilistic=True))
    return path, head


def test_reloaded_program_equals_the_head_at_other_sizes(exported):
    path, head = exported
    segmenter = load(path)
    for shape in [(1, C, 3, 3), (3, C, 9, 2), (2, C, 17, 11)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ours, reference = segmenter(x), head(x)
        assert set(ours) == {"code", "cluster_logits", "linear_logits", "variance"}
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-5)


class DroppedOut(ToyHead):
    """ToyHead with dropout on its code: train and eval mode differ."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(features)
        return {**out, "code": self.dropout(out["code"])}


def test_save_exports_an_eval_copy_and_leaves_the_callers_head_alone(tmp_path):
    """The program is the head in eval mode (dropout off), exported from a CPU copy: the caller's head keeps its
    mode and its parameter tensors (a trainer's head on CUDA stays there)."""
    head = DroppedOut().train()
    weights = {name: param for name, param in head.named_parameters()}
    path = save(tmp_path / "segmenter.pt2", head, example(), metadata())
    assert head.training and all(param is weights[name] for name, param in head.named_parameters())
    x = torch.randn(2, C, 6, 3)
    with torch.no_grad():
        reference = head.eval()(x)
        torch.testing.assert_close(load(path)(x)["code"], reference["code"], rtol=1e-5, atol=1e-5)


def test_metadata_is_stored_with_the_format_and_feature_dim(exported):
    path, _ = exported
    meta = read_metadata(path)
    assert (meta["format"], meta["version"], meta["feature_dim"]) == (FORMAT, VERSION, C)
    assert meta["features"] == {"kind": "tokens", "layer": -1} and meta["probabilistic"] is True
    assert load(path).metadata == meta


@pytest.mark.parametrize(("outputs", "message"), [
    ({"code": None}, r"lacks \['code'\]"),
    ({"cluster_logits": lambda o: o["cluster_logits"][:, :K]}, r"'cluster_logits' has shape \(2, 4, 4, 5\)"),
    ({"variance": lambda o: o["code"]}, r"'variance' has shape \(2, 6, 4, 5\)"),
    ({"extra": lambda o: o["code"]}, r"unknown outputs \['extra'\]"),
])
def test_save_refuses_a_head_that_breaks_the_contract_and_writes_nothing(tmp_path, outputs, message):
    path = tmp_path / "export" / "segmenter.pt2"
    with pytest.raises(SegmenterFormatError, match=message):
        save(path, ToyHead(outputs=outputs), example(), metadata())
    assert not path.exists() and not list(tmp_path.rglob("*.pt2"))


def test_save_refuses_metadata_missing_a_key(tmp_path):
    meta = metadata()
    del meta["selected_by"]
    with pytest.raises(SegmenterFormatError, match=r"metadata lacks \['selected_by'\]"):
        save(tmp_path / "s.pt2", ToyHead(), example(), meta)
    with pytest.raises(SegmenterFormatError, match="kind 'attention' is unknown"):
        save(tmp_path / "s.pt2", ToyHead(), example(), metadata(features={"kind": "attention"}))


class DataDependent(ToyHead):
    def forward(self, features):
        out = super().forward(features)
        if features.shape[-1] == 5:  # specialises on the example's width: wrong at any other size
            out["code"] = out["code"] * 2
        return out


def test_save_refuses_a_program_that_differs_from_the_head(tmp_path):
    with pytest.raises(SegmenterFormatError, match="not exportable with dynamic batch, height and width"):
        save(tmp_path / "s.pt2", DataDependent(), example(), metadata())
    assert not (tmp_path / "s.pt2").exists()


def _rewrite_archive(source: Path, target: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            suffix = next((k for k in replace if item.filename.endswith(k)), None)
            zout.writestr(item, replace[suffix] if suffix else zin.read(item.filename))


def test_a_program_whose_outputs_break_the_contract_is_refused_on_load(tmp_path):
    head = ToyHead(outputs={"cluster_logits": lambda o: o["cluster_logits"][:, :K]}).eval()
    dims = {0: torch.export.Dim("b", min=1), 2: torch.export.Dim("h", min=1), 3: torch.export.Dim("w", min=1)}
    program = torch.export.export(head, (example(),), dynamic_shapes={"features": dims}, strict=False)
    path = tmp_path / "bad.pt2"
    torch.export.save(program, path, extra_files={"metadata.json": json.dumps(
        {"format": FORMAT, "version": VERSION, **metadata(), "feature_dim": C})})
    with pytest.raises(SegmenterFormatError, match="'cluster_logits' has shape"):
        load(path)


class Payload:
    """Unpickling this runs `Path.touch(marker)`: what a crafted file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_sample_inputs_member_runs_nothing(exported, tmp_path):
    path, _ = exported
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)  # a zip torch.save file that torch.export.load would unpickle unrestricted
    crafted = tmp_path / "crafted.pt2"
    _rewrite_archive(path, crafted, {"data/sample_inputs/model.pt": buffer.getvalue()})
    with pytest.raises(SegmenterFormatError, match="sample_inputs/model.pt is a pickle that the safe loader refuses"):
        load(crafted)
    assert not marker.exists()
    # torch.export.load itself runs it (and then fails on what it unpickled): the check above is what stands in the way.
    with contextlib.suppress(Exception):
        torch.export.load(crafted)
    assert marker.exists()


def test_raw_pickle_renamed_pt2_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "segmenter.pt2"
    crafted.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(SegmenterFormatError, match="not an exported program"):
        load(crafted)
    assert not marker.exists()


def test_version_1_segmenter_gets_a_re_export_message(tmp_path):
    old = tmp_path / "segmenter.pt"
    torch.save({"format": FORMAT, "version": 1, "metadata": {}, "head": {}, "state_dict": {}}, old)
    with pytest.raises(SegmenterFormatError, match=r"version-1 segmenter.pt .* re-export by resuming"):
        load(old)


def test_files_that_are_not_programs(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(os.urandom(256))
    with pytest.raises(SegmenterFormatError, match="not a .pt2 zip archive"):
        load(tmp_path / "junk.pt2")
    with zipfile.ZipFile(tmp_path / "empty.pt2", "w") as z:
        z.writestr("x/readme.txt", "hello")
    with pytest.raises(SegmenterFormatError, match="without an exported program"):
        load(tmp_path / "empty.pt2")
    with pytest.raises(FileNotFoundError, match="No exported segmenter"):
        load(tmp_path / "missing.pt2")


def test_metadata_of_another_format_is_refused(exported, tmp_path):
    path, _ = exported
    crafted = tmp_path / "other.pt2"
    _rewrite_archive(path, crafted, {"extra/metadata.json": json.dumps({**metadata(), "format": "x"}).encode()})
    with pytest.raises(SegmenterFormatError, match="metadata format/version"):
        load(crafted)
