"""Type checking for `shared.config`: values from YAML and the command line checked against dataclass fields.

Kept apart from the parsing so each file reads on its own: `config.py` decides where values come from,
this module decides whether they fit (and converts them where that loses nothing, e.g. an int for a float).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key, its source and what is expected."""


class TypeMismatch(Exception):
    """A value does not fit an annotation (turned into a ConfigError naming the key)."""


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the dataclass ``cls`` (handles ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType


def coerce_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` checked (and where lossless, converted) against the annotation ``tp``.

    Raises TypeMismatch for a plain mismatch; ConfigError for errors inside nested dataclasses.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeMismatch
        return validate_mapping(tp, value, key, source)
    if is_union(origin):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce_value(value, option, key, source)
            except TypeMismatch:
                continue
        raise TypeMismatch
    if origin is Literal:
        # `True == 1`, so compare types as well as values.
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        raise TypeMismatch
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return _coerce_container(value, tp, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeMismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeMismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise TypeMismatch from None
        raise TypeMismatch
    if tp is type(None):
        if value is None:
            return None
        raise TypeMismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeMismatch
    raise ConfigError(f"Config key {key!r} has an annotation ({type_name(tp)}) that the config loader cannot check.")


def _coerce_container(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check list / tuple / dict values element by element."""
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeMismatch
        if not args:
            return dict(value)
        return {
            coerce_value(k, args[0], f"{key}.{k}", source): coerce_value(v, args[1], f"{key}.{k}", source)
            for k, v in value.items()
        }
    if not isinstance(value, (list, tuple)):
        raise TypeMismatch
    if origin is list:
        item = args[0] if args else Any
        return [coerce_value(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    # tuple: tuple[int, ...] (any length) or tuple[int, str] (fixed length)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce_value(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
    if len(value) != len(args):
        raise TypeMismatch
    return tuple(coerce_value(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))


def check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """coerce_value, turning a mismatch into a ConfigError that names key, value, source and expected type."""
    try:
        return coerce_value(value, tp, key, source)
    except TypeMismatch:
        hint = ""
        if typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
            hint = " Write a list as [a, b, c]."
        elif tp is str or (is_union(typing.get_origin(tp)) and str in typing.get_args(tp)):
            hint = " Quote the value in YAML to keep it a string."
        raise ConfigError(
            f"Config key {key!r} expects {type_name(tp)} but got {value!r} ({type(value).__name__}) "
            f"from {source}.{hint}"
        ) from None


def validate_mapping(cls: type, data: dict, prefix: str, source: str) -> dict:
    """Check the keys and values of one layer (YAML file or command line) against dataclass ``cls``.

    Returns the coerced values as a nested dict (nested dataclasses stay dicts so layers can be merged).
    """
    types_ = field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        full = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        where = f" under {prefix!r}" if prefix else ""
        raise ConfigError(
            f"Unknown config key {full!r} in {source}; valid keys{where} are: {', '.join(sorted(types_))}."
        )
    return {
        name: check_value(v, types_[name], f"{prefix}.{name}" if prefix else name, source) for name, v in data.items()
    }


def deep_merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (nested dicts merge, everything else is replaced)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dataclass_option(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``Model`` or ``Optional[Model]``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if is_union(typing.get_origin(tp)):
        for option in typing.get_args(tp):
            if dataclasses.is_dataclass(option) and isinstance(option, type):
                return option
    return None


def instantiate(cls: type, values: dict, prefix: str = "", base: Any = None) -> Any:
    """Build ``cls`` from merged, already-checked values; unset fields keep ``base``'s value or the default."""
    types_ = field_types(cls)
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
        sub_cls = dataclass_option(types_[name])
        if sub_cls is not None and isinstance(value, dict):
            # Start from the parent's default for this field, so a partial override keeps its other values.
            sub_base = getattr(base, name, None) if base is not None else field_default(cls, name)
            sub_base = sub_base if isinstance(sub_base, sub_cls) else None
            value = instantiate(sub_cls, value, f"{prefix}.{name}" if prefix else name, sub_base)
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def field_default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None
