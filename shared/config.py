"""Typed run configuration: dataclass defaults <- YAML file <- ``key=value`` command-line overrides.

Every trainer describes its settings as a (possibly nested) dataclass whose defaults are the paper's values.
``parse_args`` turns a command line into an instance of it::

    python -m stego.train --config stego/configs/cocostuff27.yaml --resume auto lr=1e-4 model.dim=70

Rules (the point is that a typo never silently trains the wrong thing):

- Precedence: dataclass defaults, then the YAML file, then ``key=value`` overrides, left to right.
- Dotted keys (``model.dim=70``) reach fields of nested dataclasses; in YAML, nesting is a nested mapping.
- Command-line values are parsed with ``yaml.safe_load`` (``true``, ``[1, 2]``, ``null``), then checked
  against the field's annotation: ``int``, ``float`` (an int is accepted; so is ``1e-4``, which YAML 1.1
  reads as a string), ``bool``, ``str`` (the raw text is kept, so ``name=007`` stays ``"007"``),
  ``Optional[...]``, ``list[...]``, ``tuple[...]``, ``dict[str, ...]``, ``Literal[...]`` and nested
  dataclasses.
- An unknown key, a wrong type, a duplicated YAML key or a missing required field raises ``ConfigError``
  naming the key (and the YAML file it came from), the valid keys or the expected type.
- ``--resume VALUE`` sets the field ``resume`` (``auto``, a checkpoint path, or ``none``).

``save_resolved_config`` writes the resolved values plus ``git_commit`` and ``git_dirty`` to
``<run_dir>/config.yaml`` atomically; such a file can be given back to ``--config`` (those two keys are
ignored when reading) to repeat a run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from shared.atomic_io import atomic_write_text
from shared.config_ranges import check_config
from shared.config_types import (
    ConfigError,
    TypeMismatch,
    check_value,
    coerce_value,
    dataclass_option,
    deep_merge,
    field_default,
    field_types,
    instantiate,
    type_name,
    validate_mapping,
)
from shared.provenance import git_commit, git_dirty

__all__ = [
    "ConfigError",
    "parse_args",
    "load_config",
    "config_to_dict",
    "save_resolved_config",
    "git_commit",
    "git_dirty",
]

# Keys that save_resolved_config adds; tolerated at the top level of a YAML file so a saved config can be reused.
PROVENANCE_KEYS = ("git_commit", "git_dirty")
_CLI = "the command line"


# ----------------------------------------------------------------------------------------------- YAML reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicated mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"Duplicated key {key!r} at line {key_node.start_mark.line + 1}; keep only one.")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml(path: Path) -> dict:
    """Read a YAML mapping from ``path``; an empty file is an empty mapping."""
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; check the --config path.")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"In config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of key: value, not a {type(data).__name__}.")
    return data


# ----------------------------------------------------------------------------------------------- overrides


def _leaf_type(cls: type, dotted: str) -> Any:
    """Annotation of the field reached by ``dotted`` (e.g. ``model.dim``); ConfigError naming the bad part."""
    tp: Any = cls
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        sub_cls = dataclass_option(tp)
        prefix = ".".join(parts[:depth])
        if sub_cls is None:
            raise ConfigError(
                f"Config key {dotted!r} from {_CLI}: {prefix!r} is not a nested config section; set it directly "
                f"as {prefix}=VALUE."
            )
        types_ = field_types(sub_cls)
        if part not in types_:
            where = f" under {prefix!r}" if prefix else ""
            raise ConfigError(
                f"Unknown config key {dotted!r} in {_CLI}; valid keys{where} are: {', '.join(sorted(types_))}."
            )
        tp = types_[part]
    return tp


def _parse_cli_value(raw: str, tp: Any, key: str) -> Any:
    """Parse ``raw`` with YAML rules; if that does not fit ``tp`` but the raw text does (a str field), keep it."""
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        parsed = raw
    try:
        return coerce_value(parsed, tp, key, _CLI)
    except TypeMismatch:
        pass
    try:
        return coerce_value(raw, tp, key, _CLI)
    except TypeMismatch:
        return check_value(parsed, tp, key, _CLI)  # raises the ConfigError naming the key


def _override_layer(cls: type, overrides: typing.Iterable[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a checked nested dict ``{"a": {"b": 1}, "c": "x"}``."""
    layer: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"Command-line argument {item!r} is not of the form key=value.")
        value = _parse_cli_value(raw, _leaf_type(cls, key), key)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        layer = deep_merge(layer, nested)
    return layer


# ----------------------------------------------------------------------------------------------- public API


def load_config(config_cls: type, yaml_path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()):
    """Build ``config_cls`` from its defaults, then the YAML file ``yaml_path``, then ``key=value`` overrides.

    Raises ConfigError naming the offending key (and file) for unknown keys, wrong types and missing values, and
    naming the key, the value and the valid range for a value outside its range (`shared.config_ranges`).
    """
    if not (dataclasses.is_dataclass(config_cls) and isinstance(config_cls, type)):
        raise TypeError(f"load_config expects a dataclass type, got {config_cls!r}.")
    merged: dict = {}
    if yaml_path is not None and str(yaml_path) != "":
        path = Path(yaml_path)
        data = _read_yaml(path)
        names = field_types(config_cls)
        data = {k: v for k, v in data.items() if not (k in PROVENANCE_KEYS and k not in names)}
        merged = validate_mapping(config_cls, data, "", f"config file {path}")
    merged = deep_merge(merged, _override_layer(config_cls, overrides))
    cfg = instantiate(config_cls, merged)
    check_config(cfg)  # valid ranges (RunConfig checks itself too; other dataclasses are checked here)
    return cfg


_USAGE = "usage: [--config PATH.yaml] [--resume auto|PATH|none] [key=value ...]"


def parse_args(config_cls: type, argv: typing.Sequence[str] | None = None):
    """Parse ``[--config PATH] [--resume VALUE] [key=value ...]`` (``argv`` defaults to ``sys.argv[1:]``).

    ``--resume X`` is the same as ``resume=X`` given after every other override. ``-h``/``--help`` prints the
    keys with their defaults and exits.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    yaml_path: str | None = None
    resume: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if arg in ("-h", "--help"):
            print(_USAGE + "\n" + _describe(config_cls))
            raise SystemExit(0)
        if flag in ("--config", "--resume"):
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"{flag} needs a value; {_USAGE}.")
            if flag == "--config":
                yaml_path = value
            else:
                resume = value
        elif arg.startswith("-"):
            raise ConfigError(f"Unknown option {arg!r}; {_USAGE}.")
        else:
            overrides.append(arg)
        i += 1
    if resume is not None:
        if "resume" not in field_types(config_cls):
            raise ConfigError(f"--resume was given but {config_cls.__name__} has no `resume` field.")
        overrides.append(f"resume={resume}")
    return load_config(config_cls, yaml_path, overrides)


def _describe(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """One line per key: ``name: type = default`` (nested sections expanded with their parent's defaults)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name) if defaults is not None else field_default(cls, f.name)
        sub = dataclass_option(tp)
        if sub is not None and isinstance(default, sub):
            lines.append(_describe(sub, key + ".", default))
        else:
            lines.append(f"  {key}: {type_name(tp)} = {default!r}")
    return "\n".join(lines)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists), safe for YAML, JSON and torch.load."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}.")
    return plain(cfg)


def save_resolved_config(cfg: Any, run_dir: str | os.PathLike) -> Path:
    """Write ``<run_dir>/config.yaml``: every resolved value plus ``git_commit`` and ``git_dirty``.

    The write is atomic (temporary file in ``run_dir``, fsync, rename), so a crash never leaves half a file.
    Call it on rank 0 only. Returns the path written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    data["git_commit"] = git_commit()
    data["git_dirty"] = git_dirty()
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    path = run_dir / "config.yaml"
    return atomic_write_text(path, text)
