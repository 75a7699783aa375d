"""Where a run lives and what it may build on: the run directory (checked and locked while a run trains into it),
and the base segmenter of a method that trains on another method's export (PriMaPs "+SotA", PU-SegNet).
"""

from __future__ import annotations

from pathlib import Path

from shared.checkpoint import last_checkpoint_path
from shared.features import canonical_descriptor
from shared.run_lock import LOCK_NAME, RunDirError, RunLockedError, run_lock  # noqa: F401 - part of this API
from shared.segmenter import FILENAME, SegmenterFormatError, read_metadata

EXPORT_RELATIVE = Path("export") / FILENAME
RUN_PREFIX = "run:"


def run_directory(cfg, method: str) -> Path:
    """``<output_root>/<method>/<dataset>/<name>``."""
    return Path(cfg.output_root) / method / cfg.dataset / cfg.name


def check_fresh_start(run_dir: Path, resume: str, overwrite: bool) -> None:
    """A run that does not resume must not train over another run's checkpoints or export unless ``overwrite=true``.
    """
    if str(resume).strip().lower() not in ("", "none") or overwrite:
        return
    for held in (last_checkpoint_path(run_dir), run_dir / EXPORT_RELATIVE):
        if held.is_file():
            raise RunDirError(f"run directory {run_dir} already holds a run ({held}); resume it with --resume auto, "
                              "pick another name=..., or pass overwrite=true to start afresh there.")


def resolve_base_segmenter(value: str, *, output_root: str, dataset: str, name: str) -> Path | None:
    """The segmenter file a ``base_segmenter`` value names, or None for "".

    Accepts a ``segmenter.pt2`` path, a run directory (its export/segmenter.pt2), or ``run:<method>`` /
    ``run:<method>/<name>`` for that method's run under the same output root and dataset (same name by default).
    """
    value = value.strip()
    if not value:
        return None
    if value.startswith(RUN_PREFIX):
        method, _, run_name = value[len(RUN_PREFIX):].partition("/")
        path = Path(output_root) / method / dataset / (run_name or name) / EXPORT_RELATIVE
        hint = f"train {method} first (name={run_name or name}, dataset={dataset}, output_root={output_root})"
    else:
        path = Path(value).expanduser()
        if path.is_dir():
            path = path / EXPORT_RELATIVE
        hint = "pass the export/segmenter.pt2 of a trained run (or its run directory)"
    if not path.is_file():
        raise RunDirError(f"base_segmenter={value!r}: no exported segmenter at {path}; {hint}.")
    return path


def check_base_compatible(path: Path, backbone, n_classes: int | None = None) -> dict:
    """The base segmenter's metadata, after checking it was trained on this backbone, weights and features."""
    try:
        meta = read_metadata(path)
    except (SegmenterFormatError, FileNotFoundError) as error:
        raise RunDirError(f"base_segmenter: {error}") from None
    ours = (backbone.name, backbone.weights_id, canonical_descriptor(backbone.descriptor))
    theirs = (meta["backbone"], meta["backbone_weights_id"], meta["features"])
    if ours != theirs:
        raise RunDirError(f"base_segmenter {path} was trained on {theirs[0]} weights {theirs[1]} with features "
                          f"{theirs[2]}, but this run uses {ours[0]} weights {ours[1]} with features {ours[2]}; set "
                          "backbone=, backbone_weights= and features= to the base's, or train a base on this backbone.")
    if n_classes is not None and int(meta["n_clusters"]) < n_classes:
        raise RunDirError(f"base_segmenter {path} has {meta['n_clusters']} clusters, fewer than the {n_classes} "
                          "classes of the dataset; train the base with at least that many clusters.")
    return meta
