"""Import an official STEGO checkpoint (mhamilton723/STEGO, a PyTorch Lightning `.ckpt`) as an exported segmenter.

    python -m stego.convert cocostuff27_vit_base_5.ckpt out/export/segmenter.pt2 --backbone dino_vitb8 \
        [--dataset cocostuff27] [--backbone-weights PATH | --weights-id ID] [--resolution 320] [--alpha 2]

The official `LitUnsupervisedSegmenter` keeps in `state_dict`:
  net.cluster1.0.{weight,bias}            linear branch  Conv2d(C -> D)
  net.cluster2.{0,2}.{weight,bias}        nonlinear branch Conv2d(C -> C), ReLU, Conv2d(C -> D)
  cluster_probe.clusters                  (K + extra, D) centres (cosine, softmax temperature 2 at evaluation)
  linear_probe.{weight,bias}              Conv2d(D -> K)
(plus the DINO backbone `net.model.*`, `train_cluster_probe.*` and `decoder.*`, which are not needed).
Its featurizer reads the normed last-block patch tokens, which is what our frozen backbone returns.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

from dinov2_patched import model_spec, weights_fingerprint
from dinov2_patched.weights import cache_dir
from shared.cli import at_least, positive_float, run_cli
from stego import safe_pickle
from stego.model import StegoHead

LINEAR = ("net.cluster1.0.weight", "net.cluster1.0.bias")
NONLINEAR = ("net.cluster2.0.weight", "net.cluster2.0.bias", "net.cluster2.2.weight", "net.cluster2.2.bias")
REQUIRED = (*LINEAR, "cluster_probe.clusters")


class UnsafeCheckpointError(ValueError):
    """The checkpoint pickles something other than tensors, plain values and Lightning/OmegaConf classes."""


def _unreadable(path: Path, error: BaseException) -> ValueError:
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    return ValueError(f"STEGO checkpoint {path} is not a readable PyTorch file ({reason}); pass the official .ckpt "
                      "file, downloaded again if it may be truncated.")


def load_official_checkpoint(path: Path):
    """The unpickled checkpoint, read without running any code from it (see stego.safe_pickle).

    `weights_only=True` reads bare state dicts; a Lightning checkpoint, whose hyper-parameters pickle OmegaConf
    and Lightning classes, is refused there (UnpicklingError) and read again through the allow-list.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as error:  # torch raises RuntimeError, EOFError, OSError, ... for files it cannot parse
        raise _unreadable(path, error) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle.module)
    except safe_pickle.RefusedGlobal as error:
        raise UnsafeCheckpointError(
            f"STEGO checkpoint {path} pickles {error.qualname}, which is neither a tensor, a plain value nor a "
            "Lightning/OmegaConf class, so it was not loaded (it could run code); convert only official "
            "checkpoints from mhamilton723/STEGO.") from error
    except Exception as error:
        raise _unreadable(path, error) from error


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of an official checkpoint (or a bare state dict), as tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STEGO checkpoint {path} does not exist; pass the path of the official .ckpt file.")
    blob = load_official_checkpoint(path)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state_dict; expected an official STEGO Lightning checkpoint.")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}; is it an official STEGO checkpoint (keys net.cluster1.*, "
                       f"cluster_probe.clusters, linear_probe.*)? Found e.g. {sorted(state)[:5]}.")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def head_from_official(state: dict[str, torch.Tensor]) -> StegoHead:
    """Our StegoHead carrying the official `net.cluster1` / `net.cluster2` weights."""
    weight = state["net.cluster1.0.weight"]  # (D, C, 1, 1)
    code_dim, in_dim = int(weight.shape[0]), int(weight.shape[1])
    has_nonlinear = any(k in state for k in NONLINEAR)
    if has_nonlinear and not all(k in state for k in NONLINEAR):
        raise ValueError(f"official checkpoint has part of the nonlinear branch; it needs all of {list(NONLINEAR)}.")
    head = StegoHead(in_dim, code_dim, nonlinear=has_nonlinear)
    mapped = {"linear_branch.weight": state["net.cluster1.0.weight"],
              "linear_branch.bias": state["net.cluster1.0.bias"]}
    if has_nonlinear:
        for index in (0, 2):
            for kind in ("weight", "bias"):
                mapped[f"nonlinear_branch.{index}.{kind}"] = state[f"net.cluster2.{index}.{kind}"]
    head.load_state_dict(mapped, strict=True)
    return head.eval()


def backbone_weights_id(backbone: str, weights_path: str | None, weights_id: str | None) -> str:
    """Fingerprint of the backbone weights the head was trained on (matches our feature caches)."""
    if weights_id:
        return weights_id
    if weights_path:
        return weights_fingerprint(weights_path)
    official = cache_dir() / model_spec(backbone)["file"]
    if official.is_file():
        return weights_fingerprint(official)
    print(f"warning: {official} not found, so the backbone weights id cannot be computed; the export says "
          f"'official:{official.name}'. Pass --backbone-weights PATH (or --weights-id) to match feature caches.",
          file=sys.stderr)
    return f"official:{official.name}"


def convert(ckpt: str | Path, out: str | Path, *, backbone: str, dataset: str = "unknown", resolution: int = 320,
            alpha: float = 2.0, feature_layer: int = -1, backbone_weights: str | None = None,
            weights_id: str | None = None) -> Path:
    """Write the official checkpoint `ckpt` as our exported segmenter `out` (a segmenter.pt2); returns `out`."""
    import torch  # local: keeps `python -m stego.convert --help` fast

    from shared.probes import ClusterProbe, LinearProbe
    from shared.segmenter import save
    from stego.model import StegoEvalHead

    state = read_official_state_dict(ckpt)
    head = head_from_official(state)
    feature_dim = int(model_spec(backbone)["embed_dim"])
    if head.in_dim != feature_dim:
        raise ValueError(f"{ckpt}: the head reads {head.in_dim}-channel features but {backbone} gives {feature_dim}; "
                         "pass the backbone the checkpoint was trained on (--backbone).")
    centres = state["cluster_probe.clusters"]
    linear_weight, linear_bias = state.get("linear_probe.weight"), state.get("linear_probe.bias")
    n_classes = int(linear_weight.shape[0]) if linear_weight is not None else int(centres.shape[0])
    cluster_probe = ClusterProbe(head.code_dim, n_classes, n_extra=int(centres.shape[0]) - n_classes)
    linear_probe = LinearProbe(head.code_dim, n_classes)
    with torch.no_grad():
        cluster_probe.centres.copy_(centres)
        if linear_weight is not None:
            linear_probe.conv.weight.copy_(linear_weight.reshape(linear_probe.conv.weight.shape))
            if linear_bias is not None:
                linear_probe.conv.bias.copy_(linear_bias)
    eval_head = StegoEvalHead(head, cluster_probe, linear_probe, alpha)
    metadata = {
        "method": "stego", "backbone": backbone,
        "backbone_weights_id": backbone_weights_id(backbone, backbone_weights, weights_id),
        "pretrained_backbone": True, "features": {"kind": "tokens", "layer": feature_layer},
        "resolution": resolution, "n_classes": n_classes, "n_clusters": int(centres.shape[0]),
        "code_dim": head.code_dim, "dataset": dataset, "probabilistic": False, "selected_by": "official checkpoint",
        "converted_from": str(ckpt)}
    example = torch.randn(2, feature_dim, 4, 5, generator=torch.Generator().manual_seed(0))
    return save(out, eval_head, example, metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an official STEGO checkpoint into an exported segmenter.")
    parser.add_argument("ckpt", help="official STEGO .ckpt (e.g. cocostuff27_vit_base_5.ckpt)")
    parser.add_argument("out", help="output segmenter path, e.g. runs/stego/cocostuff27/official/export/segmenter.pt2")
    parser.add_argument("--backbone", required=True, help="backbone it was trained on, e.g. dino_vitb8 or dino_vits8")
    parser.add_argument("--dataset", default="unknown", help="dataset name for the metadata, e.g. cocostuff27")
    parser.add_argument("--resolution", type=at_least(8), default=320,
                        help="evaluation resolution (the original's 320)")
    parser.add_argument("--alpha", type=positive_float, default=2.0,
                        help="cluster softmax temperature (the original's 2)")
    parser.add_argument("--feature-layer", type=int, default=-1)
    parser.add_argument("--backbone-weights", default=None, help="the backbone weight file, to fingerprint it")
    parser.add_argument("--weights-id", default=None, help="use this backbone weights id instead")
    args = parser.parse_args(argv)
    out = convert(args.ckpt, args.out, backbone=args.backbone, dataset=args.dataset, resolution=args.resolution,
                  alpha=args.alpha, feature_layer=args.feature_layer, backbone_weights=args.backbone_weights,
                  weights_id=args.weights_id)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)  # bad input: one line, no traceback, exit code 2 (--debug shows the traceback)
