"""Exported segmenters: a method-agnostic head description plus a state dict, and the module that runs it.

File format (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "uss-segmenter", "version": 1,
     "metadata": {method, backbone, backbone_weights_id, pretrained_backbone, feature_layer, resolution,
                  n_classes, n_clusters, code_dim, dataset, probabilistic, ...},
     "head": {"code_branches": [[op, ...], ...], "cluster": {"alpha": a, "normalize": True}, "linear": bool},
     "state_dict": {key: tensor, ...}}

``code = sum of branches(features)``; each branch is a list of ops applied in order (see ``OPS``). The cluster
centres live at ``state_dict["cluster.centres"]`` (K', D) and the linear probe at ``linear.weight`` (K, D, 1, 1)
/ ``linear.bias`` (K,). Extending the format: a later method adds a new *optional* head entry (e.g. an op list
producing a "variance" output) and the loader grows one branch for it; the loader rejects head entries it
does not know, so an old toolkit never silently drops an output it cannot compute.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.atomic_io import atomic_open

FORMAT = "uss-segmenter"
VERSION = 1
REQUIRED_METADATA = ("method", "backbone", "backbone_weights_id", "pretrained_backbone", "feature_layer",
                     "resolution", "n_classes", "n_clusters", "code_dim", "dataset", "probabilistic")
HEAD_KEYS = ("code_branches", "cluster", "linear")
# op name -> keys of state_dict tensors it needs (optional ones may be None)
OPS = {
    "conv1x1": ("weight",), "relu": (), "silu": (), "identity": (), "l2norm": (),
    "batchnorm": ("weight", "bias", "running_mean", "running_var"),
}


class SegmenterFormatError(ValueError):
    """An exported segmenter file is missing something or was written by an incompatible version."""


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def _tensor(state: dict, key: str | None, where: str, path: str) -> torch.Tensor | None:
    if key is None:
        return None
    if key not in state:
        raise SegmenterFormatError(f"{path}: {where} refers to state_dict key {key!r}, which is missing; "
                                   "re-export the segmenter.")
    return state[key]


def _build_op(op: dict, state: dict, where: str, path: str) -> nn.Module:
    """One op description -> an nn.Module holding copies of its tensors."""
    name = op.get("op") if isinstance(op, dict) else None
    if name not in OPS:
        raise SegmenterFormatError(f"{path}: {where} has unknown op {name!r}; known ops are {sorted(OPS)}.")
    if name == "conv1x1":
        weight = _tensor(state, op.get("weight"), where, path)
        if weight is None:
            raise SegmenterFormatError(f"{path}: {where} (conv1x1) has no 'weight' key.")
        weight = weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
        bias = _tensor(state, op.get("bias"), where, path)
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv
    if name == "batchnorm":
        tensors = {k: _tensor(state, op.get(k), where, path) for k in OPS["batchnorm"]}
        missing = [k for k, v in tensors.items() if v is None]
        if missing:
            raise SegmenterFormatError(f"{path}: {where} (batchnorm) lacks {missing}.")
        bn = nn.BatchNorm2d(tensors["weight"].shape[0], eps=float(op.get("eps", 1e-5)))
        with torch.no_grad():
            for k, v in tensors.items():
                getattr(bn, k).copy_(v)
        return bn
    return {"relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity, "l2norm": L2Norm}[name]()


class Segmenter(nn.Module):
    """features (B, C, h, w) -> {"code": (B, D, h, w), "cluster_logits": (B, K', h, w),
    "linear_logits": (B, K, h, w) or None}. Built by :func:`load`; ``metadata`` is the exported dict."""

    def __init__(self, branches: list[nn.Sequential], centres: torch.Tensor, alpha: float, normalize: bool,
                 linear: nn.Conv2d | None, metadata: dict) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.register_buffer("centres", centres.detach().clone())
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self.linear = linear
        self.metadata = dict(metadata)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        code = sum(branch(features) for branch in self.branches)
        if self.normalize:
            inner = torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(self.centres, dim=1))
        else:
            inner = torch.einsum("bdhw,kd->bkhw", code, self.centres)
        linear_logits = self.linear(code) if self.linear is not None else None
        return {"code": code, "cluster_logits": self.alpha * inner, "linear_logits": linear_logits}


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], key: str, path: str) -> None:
    if tuple(tensor.shape) != shape:
        raise SegmenterFormatError(f"{path}: state_dict[{key!r}] has shape {tuple(tensor.shape)} but the metadata "
                                   f"(n_classes, n_clusters, code_dim) asks for {shape}; re-export the segmenter.")


def _build(head: dict, state: dict, metadata: dict, path: str) -> Segmenter:
    """Check the head against the state dict and metadata, and build the module (save uses it to fail early)."""
    code_branches, cluster = head["code_branches"], head["cluster"]
    if not isinstance(code_branches, list) or not code_branches:
        raise SegmenterFormatError(f"{path}: head.code_branches must be a non-empty list of op lists.")
    if not isinstance(cluster, dict):
        raise SegmenterFormatError(f"{path}: head.cluster must be a dict with 'alpha' and 'normalize'.")
    branches = [nn.Sequential(*[_build_op(op, state, f"head.code_branches[{b}][{o}]", path)
                                for o, op in enumerate(branch)])
                for b, branch in enumerate(code_branches)]
    code_dim = int(metadata["code_dim"])
    centres = _tensor(state, "cluster.centres", "head.cluster", path)
    _check_shape(centres, (int(metadata["n_clusters"]), code_dim), "cluster.centres", path)
    linear = None
    if head["linear"]:
        linear = _build_op({"op": "conv1x1", "weight": "linear.weight",
                            "bias": "linear.bias" if "linear.bias" in state else None}, state, "head.linear", path)
        _check_shape(linear.weight, (int(metadata["n_classes"]), code_dim, 1, 1), "linear.weight", path)
    return Segmenter(branches, centres, alpha=cluster.get("alpha", 2.0), normalize=cluster.get("normalize", True),
                     linear=linear, metadata=metadata)


def save_segmenter(path: str | os.PathLike, *, code_branches: list[list[dict]], state_dict: dict[str, torch.Tensor],
                   cluster_centres: torch.Tensor, alpha: float, linear_weight: torch.Tensor | None = None,
                   linear_bias: torch.Tensor | None = None, metadata: dict) -> Path:
    """Write an exported segmenter atomically (temporary file in the same folder, then ``os.replace``).

    ``state_dict`` holds the tensors the ops refer to; ``cluster_centres`` (K', D); ``linear_weight``
    (K, D) or (K, D, 1, 1). Validates everything :func:`load` checks, so a bad export fails here.
    """
    path = Path(path)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise SegmenterFormatError(f"{path}: metadata lacks {missing}; every export needs {list(REQUIRED_METADATA)}.")
    state = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    state["cluster.centres"] = cluster_centres.detach().cpu().clone()
    if linear_weight is not None:
        state["linear.weight"] = linear_weight.detach().cpu().reshape(linear_weight.shape[0], -1, 1, 1).clone()
        if linear_bias is not None:
            state["linear.bias"] = linear_bias.detach().cpu().clone()
    blob = {
        "format": FORMAT, "version": VERSION, "metadata": dict(metadata),
        "head": {"code_branches": code_branches, "cluster": {"alpha": float(alpha), "normalize": True},
                 "linear": linear_weight is not None},
        "state_dict": state,
    }
    _build(blob["head"], state, blob["metadata"], str(path))
    with atomic_open(path, "wb") as f:
        torch.save(blob, f)
    return path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"No exported segmenter at {path}; train a method first (it writes "
                                "export/segmenter.pt) or pass the right path.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with non-tensor objects, ...
        raise SegmenterFormatError(f"{path} is not a readable segmenter file ({type(e).__name__}: {e}).") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SegmenterFormatError(f"{path} is not an exported segmenter (format is not {FORMAT!r}); pass the "
                                   "export/segmenter.pt a trainer wrote (a training checkpoint is not one).")
    if blob.get("version") != VERSION:
        raise SegmenterFormatError(f"{path} has segmenter format version {blob.get('version')!r}; this toolkit "
                                   f"reads version {VERSION}. Re-export it with this toolkit.")
    for key in ("metadata", "head", "state_dict"):
        if not isinstance(blob.get(key), dict):
            raise SegmenterFormatError(f"{path}: missing or malformed top-level key {key!r}; re-export the segmenter.")
    missing = [k for k in REQUIRED_METADATA if k not in blob["metadata"]]
    if missing:
        raise SegmenterFormatError(f"{path}: metadata lacks {missing}; re-export the segmenter.")
    unknown = sorted(set(blob["head"]) - set(HEAD_KEYS))
    if unknown:
        raise SegmenterFormatError(f"{path}: head has entries {unknown} that this toolkit cannot run; update it.")
    for key in HEAD_KEYS:
        if key not in blob["head"]:
            raise SegmenterFormatError(f"{path}: head lacks {key!r}; re-export the segmenter.")
    return blob


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Segmenter:
    """Read and validate an exported segmenter; returns a :class:`Segmenter` in eval mode on ``map_location``."""
    path = Path(path)
    blob = _read(path)
    seg = _build(blob["head"], blob["state_dict"], blob["metadata"], str(path))
    return seg.to(map_location).eval().requires_grad_(False)
