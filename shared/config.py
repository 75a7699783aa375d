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
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from shared.atomic_io import atomic_write_text

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


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key, its source and what is expected."""


class _TypeMismatch(Exception):
    """Internal: a value does not fit an annotation (turned into a ConfigError naming the key)."""


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


# ----------------------------------------------------------------------------------------------- type checking


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the dataclass ``cls`` (handles ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` checked (and where lossless, converted) against the annotation ``tp``.

    Raises _TypeMismatch for a plain mismatch; ConfigError for errors inside nested dataclasses.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _TypeMismatch
        return _validate_mapping(tp, value, key, source)
    if _is_union(origin):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except _TypeMismatch:
                continue
        raise _TypeMismatch
    if origin is Literal:
        # `True == 1`, so compare types as well as values.
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        raise _TypeMismatch
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return _coerce_container(value, tp, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _TypeMismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _TypeMismatch from None
        raise _TypeMismatch
    if tp is type(None):
        if value is None:
            return None
        raise _TypeMismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _TypeMismatch
    raise ConfigError(f"Config key {key!r} has an annotation ({_type_name(tp)}) that the config loader cannot check.")


def _coerce_container(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check list / tuple / dict values element by element."""
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise _TypeMismatch
        if not args:
            return dict(value)
        return {
            _coerce(k, args[0], f"{key}.{k}", source): _coerce(v, args[1], f"{key}.{k}", source)
            for k, v in value.items()
        }
    if not isinstance(value, (list, tuple)):
        raise _TypeMismatch
    if origin is list:
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    # tuple: tuple[int, ...] (any length) or tuple[int, str] (fixed length)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
    if len(value) != len(args):
        raise _TypeMismatch
    return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """_coerce, turning a mismatch into a ConfigError that names key, value, source and expected type."""
    try:
        return _coerce(value, tp, key, source)
    except _TypeMismatch:
        hint = ""
        if typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
            hint = " Write a list as [a, b, c]."
        elif tp is str or (_is_union(typing.get_origin(tp)) and str in typing.get_args(tp)):
            hint = " Quote the value in YAML to keep it a string."
        raise ConfigError(
            f"Config key {key!r} expects {_type_name(tp)} but got {value!r} ({type(value).__name__}) "
            f"from {source}.{hint}"
        ) from None


def _validate_mapping(cls: type, data: dict, prefix: str, source: str) -> dict:
    """Check the keys and values of one layer (YAML file or command line) against dataclass ``cls``.

    Returns the coerced values as a nested dict (nested dataclasses stay dicts so layers can be merged).
    """
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        full = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        where = f" under {prefix!r}" if prefix else ""
        raise ConfigError(
            f"Unknown config key {full!r} in {source}; valid keys{where} are: {', '.join(sorted(types_))}."
        )
    return {
        name: _check_value(v, types_[name], f"{prefix}.{name}" if prefix else name, source) for name, v in data.items()
    }


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (nested dicts merge, everything else is replaced)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dataclass_option(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``Model`` or ``Optional[Model]``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(typing.get_origin(tp)):
        for option in typing.get_args(tp):
            if dataclasses.is_dataclass(option) and isinstance(option, type):
                return option
    return None


def _instantiate(cls: type, values: dict, prefix: str = "", base: Any = None) -> Any:
    """Build ``cls`` from merged, already-checked values; unset fields keep ``base``'s value or the default."""
    types_ = _field_types(cls)
    if base is None:
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            full = f"{prefix}.{missing[0]}" if prefix else missing[0]
            raise ConfigError(
                f"Config key {full!r} has no default and was not set; pass `{full}=...` or set it in YAML."
            )
    kwargs = {}
    for name, value in values.items():
        sub_cls = _dataclass_option(types_[name])
        if sub_cls is not None and isinstance(value, dict):
            # Start from the parent's default for this field, so a partial override keeps its other values.
            sub_base = getattr(base, name, None) if base is not None else _field_default(cls, name)
            sub_base = sub_base if isinstance(sub_base, sub_cls) else None
            value = _instantiate(sub_cls, value, f"{prefix}.{name}" if prefix else name, sub_base)
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _field_default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


# ----------------------------------------------------------------------------------------------- overrides


def _leaf_type(cls: type, dotted: str) -> Any:
    """Annotation of the field reached by ``dotted`` (e.g. ``model.dim``); ConfigError naming the bad part."""
    tp: Any = cls
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        sub_cls = _dataclass_option(tp)
        prefix = ".".join(parts[:depth])
        if sub_cls is None:
            raise ConfigError(f"Config key {dotted!r} from {_CLI}: {prefix!r} is not a nested config section.")
        types_ = _field_types(sub_cls)
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
        return _coerce(parsed, tp, key, _CLI)
    except _TypeMismatch:
        pass
    try:
        return _coerce(raw, tp, key, _CLI)
    except _TypeMismatch:
        return _check_value(parsed, tp, key, _CLI)  # raises the ConfigError naming the key


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
        layer = _merge(layer, nested)
    return layer


# ----------------------------------------------------------------------------------------------- public API


def load_config(config_cls: type, yaml_path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()):
    """Build ``config_cls`` from its defaults, then the YAML file ``yaml_path``, then ``key=value`` overrides.

    Raises ConfigError naming the offending key (and file) for unknown keys, wrong types and missing values.
    """
    if not (dataclasses.is_dataclass(config_cls) and isinstance(config_cls, type)):
        raise TypeError(f"load_config expects a dataclass type, got {config_cls!r}.")
    merged: dict = {}
    if yaml_path is not None and str(yaml_path) != "":
        path = Path(yaml_path)
        data = _read_yaml(path)
        names = _field_types(config_cls)
        data = {k: v for k, v in data.items() if not (k in PROVENANCE_KEYS and k not in names)}
        merged = _validate_mapping(config_cls, data, "", f"config file {path}")
    merged = _merge(merged, _override_layer(config_cls, overrides))
    return _instantiate(config_cls, merged)


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
        if "resume" not in _field_types(config_cls):
            raise ConfigError(f"--resume was given but {config_cls.__name__} has no `resume` field.")
        overrides.append(f"resume={resume}")
    return load_config(config_cls, yaml_path, overrides)


def _describe(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """One line per key: ``name: type = default`` (nested sections expanded with their parent's defaults)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name) if defaults is not None else _field_default(cls, f.name)
        sub = _dataclass_option(tp)
        if sub is not None and isinstance(default, sub):
            lines.append(_describe(sub, key + ".", default))
        else:
            lines.append(f"  {key}: {_type_name(tp)} = {default!r}")
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


# ----------------------------------------------------------------------------------------------- git provenance

_REPO_DIR = Path(__file__).resolve().parent.parent


def _git(args: list[str], repo_dir: str | os.PathLike | None) -> str | None:
    """stdout of ``git <args>`` run in ``repo_dir`` (default: this package's checkout), or None on any failure."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=repo_dir or _REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit(repo_dir: str | os.PathLike | None = None) -> str:
    """Commit hash of the code's checkout (or of ``repo_dir``); ``"unknown"`` outside a git repository."""
    return _git(["rev-parse", "HEAD"], repo_dir) or "unknown"


def git_dirty(repo_dir: str | os.PathLike | None = None) -> bool | None:
    """True when tracked files have uncommitted changes; None outside a git repository."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], repo_dir)
    return None if out is None else out != ""
