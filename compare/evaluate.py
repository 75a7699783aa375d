"""The comparison's evaluation loop: load exported segmenters, check they share a backbone, score each one.

Every method is scored on the cached features its descriptor names (image and horizontal flip), the same labels
and the same metric policy by `shared.evaluation.score_segmenter`, the code path a trainer's `finish_run` uses, so
the numbers agree. The linear columns come from the evaluator's own probe, fitted on each method's exported code
over the training split with one recipe for all (`shared.probes.ProbeRecipe`). A second pass over the features,
with the Hungarian mapping found by the first, measures the head's throughput and peak memory, accumulates
calibration (ECE/NLL) and keeps the class maps of the images shown in the figure. A method that raises anywhere
is recorded as failed with the first line of its error; the others still run.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compare.head_pass import head_pass, synchronize, upsample_logits
from shared.cli import debug_requested, is_known_error

SEGMENTER_RELATIVE = Path("export") / "segmenter.pt2"


@dataclass
class LoadedMethod:
    """One `--runs` entry: the segmenter when it loaded, else the error's first line."""

    name: str
    path: str
    segmenter: Any = None
    error: str = ""


@dataclass
class EvalOptions:
    """What every method is evaluated with."""

    n_classes: int
    extra_policy: str = "error"
    crf: bool = True
    batch_size: int = 16
    device: str = "cpu"
    probe_recipe: Any = None  # shared.probes.ProbeRecipe; None = no evaluator linear probe


@dataclass
class MethodResult:
    """One row of the comparison. Scores are dicts from `shared.metrics.segmentation_scores` (percent)."""

    method: str
    path: str
    status: str = "failed"
    error: str = ""
    backbone: str = ""
    backbone_weights_id: str = ""
    pretrained_backbone: bool | None = None
    features: dict | None = None
    selected_by: str = ""
    probabilistic: bool = False
    n_clusters: int | None = None
    unsupervised: dict | None = None
    crf: dict | None = None
    smoothed: dict | None = None
    linear: dict | None = None
    calibration: dict | None = None
    images_per_s: float | None = None
    peak_memory_mib: float | None = None
    # For the figure only, not serialised: (F, R, R) class ids (-1 = unmatched) and (F, R, R) uncertainty in [0, 1].
    predictions: np.ndarray | None = field(default=None, repr=False)
    uncertainty: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready dict without the figure arrays."""
        out = asdict(self)
        out.pop("predictions")
        out.pop("uncertainty")
        return out


def first_line(error: BaseException) -> str:
    """`TypeName: first line of the message`, what the report shows for a failed method."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def resolve_segmenter_path(run: str | Path) -> Path:
    """A run directory (holding export/segmenter.pt2) or a segmenter file -> the segmenter file."""
    path = Path(run)
    if path.is_dir():
        path = path / SEGMENTER_RELATIVE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory holding {SEGMENTER_RELATIVE} "
                                "or the path of a segmenter.pt2 (train or export the method first)")
    return path


def _display_name(run: str, metadata: dict | None) -> str:
    """`<method>/<run name>` from the metadata, else from the layout runs/<method>/<dataset>/<name>."""
    path = Path(run)
    method = (metadata or {}).get("method")
    if path.suffix == ".pt2" and path.parent.name != "export":
        return f"{method}/{path.stem}" if method else path.stem
    if path.suffix == ".pt2":
        path = path.parent.parent
    method = method or path.parent.parent.name
    return f"{method}/{path.name}" if method and method != path.name else path.name or str(run)


def load_methods(runs: Sequence[str], device: str = "cpu") -> list[LoadedMethod]:
    """Load every run's segmenter with `shared.segmenter.load`; a failure is kept as a LoadedMethod with error."""
    from shared.segmenter import load

    methods = []
    for run in runs:
        try:
            segmenter = load(resolve_segmenter_path(run), map_location=device)
            methods.append(LoadedMethod(_display_name(run, segmenter.metadata), run, segmenter))
        except Exception as error:  # noqa: BLE001 - any failure of one method must not stop the others
            methods.append(LoadedMethod(_display_name(run, None), run, error=first_line(error)))
    # Two runs of the same method are told apart by their path.
    names = [m.name for m in methods]
    for m in methods:
        if names.count(m.name) > 1:
            m.name = f"{m.name} ({m.path})"
    return methods


def backbone_key(metadata: dict) -> tuple[str, str]:
    """(backbone name, weights id): methods with equal keys share one backbone (each descriptor its own cache)."""
    return (str(metadata["backbone"]), str(metadata["backbone_weights_id"]))


def group_by_backbone(methods: Sequence[LoadedMethod], allow_mixed: bool) -> dict[tuple, list[LoadedMethod]]:
    """Group the loaded methods by backbone; more than one backbone is an error unless `allow_mixed`."""
    groups: dict[tuple, list[LoadedMethod]] = {}
    for m in methods:
        if m.segmenter is not None:
            groups.setdefault(backbone_key(m.segmenter.metadata), []).append(m)
    if len(groups) > 1 and not allow_mixed:
        listed = "; ".join(f"{m.path}: {k[0]} weights {k[1]}" for k, ms in groups.items() for m in ms)
        raise ValueError(f"the runs use different backbones ({listed}); a fair comparison needs one backbone, "
                         "so compare runs trained on the same backbone or pass --allow-mixed-backbones")
    return groups


def failed_result(method: LoadedMethod, error: str) -> MethodResult:
    """The row of a method that could not be loaded or evaluated."""
    result = MethodResult(method=method.name, path=method.path, error=error)
    if method.segmenter is not None:
        _fill_metadata(result, method.segmenter.metadata)
    return result


def _fill_metadata(result: MethodResult, meta: dict) -> None:
    result.backbone = str(meta.get("backbone", ""))
    result.backbone_weights_id = str(meta.get("backbone_weights_id", ""))
    result.pretrained_backbone = meta.get("pretrained_backbone")
    result.features = meta.get("features")
    result.selected_by = str(meta.get("selected_by", ""))
    result.probabilistic = bool(meta.get("probabilistic", False))
    result.n_clusters = meta.get("n_clusters")


class WithEvaluatorProbe(torch.nn.Module):
    """A segmenter whose `linear_logits` are the evaluator's probe on its code (the method's own are dropped)."""

    def __init__(self, segmenter: Any, probe: torch.nn.Module | None) -> None:
        super().__init__()
        self.segmenter, self.probe, self.metadata = segmenter, probe, segmenter.metadata

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(self.segmenter(features))
        out.pop("linear_logits", None)
        if self.probe is not None:
            out["linear_logits"] = self.probe(out["code"].float())
        return out


def evaluate_method(method: LoadedMethod, features: Any, flipped: Any, dataset: Any, options: EvalOptions,
                    figure_indices: Sequence[int] = (), train: Any = None) -> MethodResult:
    """Score one loaded method; any exception becomes a failed row (the traceback is printed unless the error is bad
    input that `shared.cli` reports on one line, or always with --debug / USS_DEBUG=1).
    `train`: the cached training split its evaluator linear probe is fitted on (None: no linear columns)."""
    if method.segmenter is None:
        return failed_result(method, method.error)
    try:
        return _evaluate(method, features, flipped, dataset, options, figure_indices, train)
    except Exception as error:  # noqa: BLE001 - reported in the table, the comparison goes on
        if debug_requested(sys.argv) or not is_known_error(error):
            traceback.print_exc()  # a bug: its traceback; bad input already says what is wrong in its row
        return failed_result(method, first_line(error))


def _evaluate(method: LoadedMethod, features: Any, flipped: Any, dataset: Any, options: EvalOptions,
              figure_indices: Sequence[int], train: Any) -> MethodResult:
    from shared.evaluation import score_segmenter
    from shared.probes import fit_evaluator_probe

    segmenter = method.segmenter.eval()
    meta = segmenter.metadata
    result = MethodResult(method=method.name, path=method.path, status="ok")
    _fill_metadata(result, meta)
    if int(meta.get("n_classes", options.n_classes)) != options.n_classes:
        raise ValueError(f"{method.path} was trained for {meta['n_classes']} classes but the dataset has "
                         f"{options.n_classes}; compare it on the dataset it was trained for")
    probe = None
    if options.probe_recipe is not None and train is not None and train.labels is not None:
        probe = fit_evaluator_probe(lambda x: segmenter(x)["code"], train.features, train.labels, options.n_classes,
                                    options.probe_recipe, options.device)
    scored = WithEvaluatorProbe(segmenter, probe)
    scores = score_segmenter(scored, features, flipped=flipped, n_classes=options.n_classes,
                             extra_policy=options.extra_policy, batch_size=options.batch_size,
                             crf_images=dataset if options.crf else None, device=options.device, crf_linear=False)
    result.unsupervised, result.linear, result.crf = scores["unsupervised"], scores.get("linear"), scores.get("crf")
    result.smoothed = scores.get("smoothed")
    measured = head_pass(segmenter, features, flipped, result.unsupervised["mapping"], options, figure_indices,
                         probabilistic=result.probabilistic)
    result.images_per_s = measured.images_per_s
    result.peak_memory_mib = measured.peak_memory_mib
    result.calibration = measured.calibration
    result.predictions, result.uncertainty = measured.predictions, measured.uncertainty
    check_finite_result(result)
    return result


def check_finite_result(result: MethodResult) -> None:
    """FloatingPointError naming every column of the row that is NaN or infinite, so the row becomes `failed` with
    that reason instead of `ok` with a NaN in the table (the head's outputs are checked while scoring)."""
    columns = {f"{kind} {key}": (getattr(result, kind) or {}).get(key)
               for kind in ("unsupervised", "crf", "smoothed", "linear") for key in ("acc", "miou")}
    columns.update({f"calibration {key}": (result.calibration or {}).get(key) for key in ("ece", "nll")})
    columns.update({"images/s": result.images_per_s, "peak memory": result.peak_memory_mib})
    bad = {name: value for name, value in columns.items()
           if isinstance(value, (int, float)) and not np.isfinite(value)}
    if bad:
        listed = ", ".join(f"{name} = {value}" for name, value in bad.items())
        raise FloatingPointError(f"non-finite scores ({listed}); the features, the head or the labels (no labelled "
                                 "pixel?) gave no usable number.")


def time_backbone(backbone: torch.nn.Module, dataset: Any, n_images: int = 4, device: str = "cpu") -> float:
    """Images/s of the backbone alone on the first `n_images` images (one warm-up image first)."""
    n = min(n_images, len(dataset))
    images = torch.stack([dataset[i]["image"] for i in range(n)]).to(device)
    with torch.no_grad():
        backbone(images[:1])
        synchronize(device)
        start = time.perf_counter()
        backbone(images)
        synchronize(device)
    return n / max(time.perf_counter() - start, 1e-9)


__all__ = ["EvalOptions", "LoadedMethod", "MethodResult", "backbone_key", "check_finite_result", "evaluate_method",
           "failed_result", "first_line", "group_by_backbone", "load_methods", "resolve_segmenter_path",
           "time_backbone", "upsample_logits"]
