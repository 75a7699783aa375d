"""Exported segmenters: a method's evaluation head as a `torch.export` program plus its metadata.

Every trainer writes ``export/segmenter.pt2`` with :func:`save`; everything that consumes a trained method
(`compare`, `predict`, a method trained on another's pseudo-labels) reads it with :func:`load`, which knows
nothing about the method's layers.

Contract of the program (dynamic batch, height and width)::

    features (B, C, h, w), as the metadata's feature descriptor produces them (C = metadata["feature_dim"])
    -> {"code": (B, D, h, w), "cluster_logits": (B, K', h, w),
        optional "linear_logits": (B, K, h, w), "variance": (B, h, w), "smoothed_logits": (B, K', h, w)}

with D = code_dim, K' = n_clusters, K = n_classes. The metadata (a JSON extra file of the archive) holds at
least the keys of ``REQUIRED_METADATA``.

Loading runs no code from the file: `torch.export.load` falls back to an unrestricted unpickler when the
restricted load of a pickled member fails, so :func:`load` first reads the archive into memory, opens every
pickled member with the restricted (``weights_only``) loader and refuses the file if any fails or if it holds
custom objects, and only then hands the same bytes to `torch.export.load`.
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from shared.atomic_io import atomic_path
from shared.features import DescriptorError, canonical_descriptor

FORMAT = "uss-segmenter"
VERSION = 2
FILENAME = "segmenter.pt2"
METADATA_FILE = "metadata.json"
REQUIRED_METADATA = ("method", "backbone", "backbone_weights_id", "pretrained_backbone", "features", "feature_dim",
                     "resolution", "n_classes", "n_clusters", "code_dim", "dataset", "probabilistic", "selected_by")
REQUIRED_OUTPUTS = ("code", "cluster_logits")
OPTIONAL_OUTPUTS = ("linear_logits", "variance", "smoothed_logits")
PROBE_SHAPE = (2, 5, 6)  # (B, h, w) of the input load() checks the output contract on
TOLERANCE = 1e-5


class SegmenterFormatError(ValueError):
    """An exported segmenter file is unreadable, unsafe, or breaks the output contract."""


class Segmenter(nn.Module):
    """A loaded program: ``segmenter(features) -> dict`` of the contract; ``metadata`` is the exported dict."""

    def __init__(self, program: nn.Module, metadata: dict, path: str = "") -> None:
        super().__init__()
        self.program = program
        self.metadata = dict(metadata)
        self.path = path

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.program(features))

    def train(self, mode: bool = True) -> Segmenter:
        """A no-op: an exported program has no training mode (its graph was traced in eval mode), and the
        program module refuses `train()`, so `eval()` and `train()` only set this wrapper's flag."""
        self.training = False
        return self


# ----------------------------------------------------------------------------------------------- checks


def check_metadata(metadata: Any, where: str) -> dict:
    """The metadata with its descriptor made canonical; SegmenterFormatError naming the missing or bad key."""
    if not isinstance(metadata, dict):
        raise SegmenterFormatError(f"{where}: the metadata is not a JSON object; re-export the segmenter.")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise SegmenterFormatError(f"{where}: metadata lacks {missing}; every export needs {list(REQUIRED_METADATA)} "
                                   "(re-export it with this toolkit).")
    try:
        features = canonical_descriptor(metadata["features"])
    except DescriptorError as error:
        raise SegmenterFormatError(f"{where}: metadata key 'features': {error}") from None
    for key in ("feature_dim", "resolution", "n_classes", "n_clusters", "code_dim"):
        value = metadata[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SegmenterFormatError(f"{where}: metadata key {key!r} must be a positive integer, got {value!r}.")
    return {**metadata, "features": features}


def check_outputs(outputs: Any, metadata: dict, batch: int, height: int, width: int, where: str) -> None:
    """SegmenterFormatError unless ``outputs`` follows the contract for an input of (batch, C, height, width)."""
    if not isinstance(outputs, dict):
        raise SegmenterFormatError(f"{where}: the program returns a {type(outputs).__name__}, not a dict of outputs; "
                                   "the head's forward must return {'code': ..., 'cluster_logits': ...}.")
    missing = [k for k in REQUIRED_OUTPUTS if k not in outputs]
    unknown = sorted(set(outputs) - set(REQUIRED_OUTPUTS) - set(OPTIONAL_OUTPUTS))
    if missing or unknown:
        what = f"lacks {missing}" if missing else f"has unknown outputs {unknown}"
        raise SegmenterFormatError(f"{where}: the program's output {what}; the contract is {list(REQUIRED_OUTPUTS)} "
                                   f"plus optionally {list(OPTIONAL_OUTPUTS)}.")
    channels = {"code": metadata["code_dim"], "cluster_logits": metadata["n_clusters"],
                "linear_logits": metadata["n_classes"], "smoothed_logits": metadata["n_clusters"]}
    for key, value in outputs.items():
        expected = (batch, height, width) if key == "variance" else (batch, channels[key], height, width)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if shape != expected:
            raise SegmenterFormatError(f"{where}: output {key!r} has shape {shape} for input features of "
                                       f"(B, h, w) = {(batch, height, width)}, but the contract and the metadata "
                                       f"ask for {expected}; fix the head or its metadata and re-export.")


def _check_equal(reference: dict, other: dict, where: str) -> None:
    for key, value in reference.items():
        diff = (value.float() - other[key].float()).abs()
        scale = max(1.0, float(value.float().abs().max()))
        if not torch.isfinite(diff).all() or float(diff.max()) > TOLERANCE * scale:
            raise SegmenterFormatError(f"{where}: the reloaded program's {key!r} differs from the in-memory head by "
                                       f"{float(diff.max()):.3g}; the head is not exportable as it is (data-dependent "
                                       "Python control flow?).")


# ----------------------------------------------------------------------------------------------- save


def _probe_features(example: torch.Tensor) -> torch.Tensor:
    """A second input of another batch and spatial size: catches a program that specialised on the example."""
    b, c, h, w = example.shape
    generator = torch.Generator().manual_seed(0)
    return torch.randn(b + 1, c, h + 1, w + 2, generator=generator, dtype=example.dtype).to(example.device)


def save(path: str | os.PathLike, head: nn.Module, example_features: torch.Tensor, metadata: dict) -> Path:
    """Export ``head`` (eval mode) as a program with dynamic batch, height and width, check it, write it atomically.

    example_features: (B >= 2, C, h >= 2, w >= 2) features as the descriptor produces them (avoid B, h or w of
    1, which `torch.export` specialises). The reloaded program must equal ``head`` to 1e-5 on the example and
    on an input of another size, before the file is renamed into place. Returns the path.
    """
    path = Path(path)
    where = str(path)
    b, c, h, w = example_features.shape
    metadata = check_metadata({"format": FORMAT, "version": VERSION, **metadata, "feature_dim": int(c)}, where)
    # Exported from a CPU copy, whatever device trained it: the program then holds CPU weights and constants and
    # `load(map_location=...)` puts it where it is used; the caller's head stays where it is.
    head = copy.deepcopy(head).cpu().eval()
    example_features = example_features.detach().cpu()
    probe = _probe_features(example_features)
    with torch.no_grad():
        expected = {k: v.detach().clone() for k, v in dict(head(example_features)).items()}
        expected_probe = {k: v.detach().clone() for k, v in dict(head(probe)).items()}
    check_outputs(expected, metadata, b, h, w, where)
    check_outputs(expected_probe, metadata, *probe.shape[:1], *probe.shape[2:], where)
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)}
    try:
        with torch.no_grad():
            program = torch.export.export(head, (example_features,), dynamic_shapes={"features": dims}, strict=False)
    except Exception as error:  # noqa: BLE001 - torch's export errors are pages long: one sentence and the first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SegmenterFormatError(f"{where}: the head is not exportable with dynamic batch, height and width "
                                   f"({type(error).__name__}: {first}); remove data-dependent Python control flow "
                                   "(branches on shapes or values, .item(), numpy) from its forward.") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp.pt2") as tmp:
        torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(metadata, sort_keys=True)})
        reloaded = load(tmp)
        with torch.no_grad():
            _check_equal(expected, reloaded(example_features), where)
            _check_equal(expected_probe, reloaded(probe), where)
    return path


# ----------------------------------------------------------------------------------------------- load


def _restricted_load(data: bytes, member: str, where: str) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the member is not plain tensors
        raise SegmenterFormatError(f"{where}: archive member {member} is a pickle that the safe loader refuses "
                                   f"({type(error).__name__}); the file may be crafted to run code, so it is not "
                                   "loaded. Re-export the segmenter with this toolkit.") from None


def _looks_pickled(data: bytes) -> bool:
    """A raw pickle (protocol 2+ starts with 0x80) or a torch.save zip."""
    return data[:1] == b"\x80" or data[:2] == b"PK"


def _raw_payloads(archive: zipfile.ZipFile, names: list[str], where: str) -> set[str]:
    """Members that the weights/constants configs declare as raw tensor bytes (never unpickled)."""
    raw: set[str] = set()
    for config_name in [n for n in names if n.endswith(("weights/model_weights_config.json",
                                                         "constants/model_constants_config.json"))]:
        folder = config_name.rsplit("/", 1)[0]
        try:
            config = json.loads(archive.read(config_name))["config"]
        except (ValueError, KeyError, TypeError):
            raise SegmenterFormatError(f"{where}: {config_name} is not a valid payload config; re-export.") from None
        for fqn, entry in config.items():
            file = str(entry.get("path_name", ""))
            if not file.startswith(("weight_", "tensor_")):
                raise SegmenterFormatError(f"{where}: the program holds a custom object {fqn!r} ({file}), which "
                                           "cannot be loaded without running code; export plain tensors only.")
            if not entry.get("use_pickle", False):
                raw.add(f"{folder}/{file}")
    return raw


def _check_archive(blob: bytes, where: str) -> None:
    """Refuse anything but a current `torch.export` archive whose every pickled member is plain tensors."""
    if not zipfile.is_zipfile(io.BytesIO(blob)):
        raise SegmenterFormatError(f"{where} is not an exported program (not a .pt2 zip archive); pass the "
                                   f"export/{FILENAME} a trainer wrote.")
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        names = archive.namelist()
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise SegmenterFormatError(
                f"{where} is a torch.save file (a version-1 segmenter.pt or a checkpoint), not an exported program; "
                "this toolkit reads segmenter.pt2 only: re-export by resuming the run that made it "
                "(python -m <method>.train --config <run dir>/config.yaml --resume auto).")
        if not any(n.endswith("/models/model.json") for n in names):
            raise SegmenterFormatError(f"{where} is a zip archive without an exported program "
                                       "(no models/model.json); pass a segmenter.pt2 written by this toolkit.")
        raw = _raw_payloads(archive, names, where)
        for name in names:
            if name in raw or name.endswith(("/", ".json")):  # raw tensor bytes, folders, JSON: never unpickled
                continue
            data = archive.read(name)
            if name.endswith(".pt") or "/data/weights/" in name or "/data/constants/" in name or _looks_pickled(data):
                _restricted_load(data, name, where)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a segmenter file without building its program (after the same safety checks)."""
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[bytes, dict]:
    where = str(path)
    if path.is_dir():
        raise SegmenterFormatError(f"{where} is a folder; pass a run directory's export/{FILENAME}, or the run "
                                   "directory through compare/predict, which find the file themselves.")
    if not path.is_file():
        raise FileNotFoundError(f"No exported segmenter at {where}; train a method first (it writes "
                                f"export/{FILENAME}) or pass the right path.")
    blob = path.read_bytes()  # read once: what is checked is exactly what is loaded
    _check_archive(blob, where)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        meta_names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")]
        if not meta_names:
            raise SegmenterFormatError(f"{where}: the archive has no {METADATA_FILE}; it was not written by "
                                       "shared.segmenter.save, so re-export it.")
        try:
            metadata = json.loads(archive.read(meta_names[0]))
        except ValueError:
            raise SegmenterFormatError(f"{where}: {METADATA_FILE} is not valid JSON; re-export it.") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        found = (metadata.get("format"), metadata.get("version")) if isinstance(metadata, dict) else metadata
        raise SegmenterFormatError(f"{where}: metadata format/version is {found}, this toolkit reads "
                                   f"({FORMAT!r}, {VERSION}); re-export the segmenter with this toolkit.")
    return blob, check_metadata(metadata, where)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Segmenter:
    """Read, check and build an exported segmenter on ``map_location``; the output contract is checked on a
    small probe input. Raises FileNotFoundError or SegmenterFormatError (one sentence naming the file)."""
    path = Path(path)
    blob, metadata = _read(path)
    where = str(path)
    try:
        program = torch.export.load(io.BytesIO(blob))
    except Exception as error:  # noqa: BLE001 - a damaged archive: one sentence, not torch's traceback
        raise SegmenterFormatError(f"{where}: torch.export could not read the program ({type(error).__name__}: "
                                   f"{str(error).splitlines()[0] if str(error) else ''}); re-export it.") from None
    device = torch.device(map_location)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    segmenter = Segmenter(program.module(), metadata, where)
    b, h, w = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(b, metadata["feature_dim"], h, w, generator=generator).to(device)
    try:
        with torch.no_grad():
            outputs = segmenter(probe)
    except Exception as error:  # noqa: BLE001 - wrong input channels, shape guards, ...
        raise SegmenterFormatError(f"{where}: the program fails on features of shape {tuple(probe.shape)} "
                                   f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                                   "re-export it.") from None
    check_outputs(outputs, metadata, b, h, w, where)
    return segmenter.eval()
