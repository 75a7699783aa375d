"""Valid ranges of config values, declared on the dataclass fields and checked when a config is built.

A method declares the range of a key where it declares its default::

    from shared.config_ranges import positive, ranged, probability

    @dataclass
    class MyConfig(RunConfig):
        batch_size: int = ranged(16, low=1)          # an integer >= 1
        lr: float = positive(1e-3)                   # > 0
        dropout: float = ranged(0.1, 0, 1, high_open=True)
        n_extra: int = ranged(0, low=0)

Each helper returns a ``dataclasses.field`` whose metadata holds a rule under ``RULE_KEY``. ``check_config``
(run by ``shared.config.load_config`` and by ``RunConfig.__post_init__``) checks every field of a config and its
nested sections, so an out-of-range value is a ``ConfigError`` naming the key, the value and the valid range
before anything is built or written. A subclass that redeclares a field only to change its default keeps the
base class's rule (rules are looked up along the MRO). Every float, with or without a rule, must be finite
(unless it is the field's own infinite default, e.g. ``max_grad_norm: float = math.inf``).
A list or tuple value is checked element by element against a ``Range``; a ``Rule`` sees the whole value (its
``test`` may raise ValueError to say why a value fails). ``resume_may_differ(default)`` marks a key (a folder's
location) that may change when a run is resumed (`shared.run_start`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from shared.config_types import ConfigError

RULE_KEY = "valid"
# Field metadata: the key may differ between a checkpoint and its resume (see shared.run_start.RESUME_MAY_DIFFER).
RESUME_MAY_DIFFER_KEY = "resume_may_differ"


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (None = unbounded); ``*_open`` excludes the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return "any finite number"

    def examples(self, integer: bool) -> tuple[list, list]:
        """(valid, invalid) values just inside and outside the bounds, for table-driven tests."""
        step = 1 if integer else 1e-3
        good, bad = [], []
        for bound, is_open, sign in ((self.low, self.low_open, 1), (self.high, self.high_open, -1)):
            if bound is None:
                continue
            good.append(bound + sign * step if is_open else bound)
            bad.append(bound if is_open else bound - sign * step)
        if integer:
            good, bad = [int(v) for v in good], [int(v) for v in bad]
        return good, bad


@dataclass(frozen=True)
class Rule:
    """Any other check: ``test(value) -> bool``, described as ``description``; examples feed the tests."""

    description: str
    test: Any
    good: tuple = ()
    bad: tuple = ()

    def ok(self, value: Any) -> bool:
        return bool(self.test(value))

    def reason(self, value: Any) -> str:
        """What was expected, and the message of a ValueError that ``test`` raised (if it did)."""
        try:
            self.test(value)
        except ValueError as error:
            return f"expected {self.description} ({str(error).rstrip('.')})"
        return f"expected {self.description}"

    def describe(self) -> str:
        return self.description

    def examples(self, integer: bool) -> tuple[list, list]:
        return list(self.good), list(self.bad)


def _field(default: Any, rule: Range | Rule | None, **metadata: Any) -> Any:
    metadata = {**({RULE_KEY: rule} if rule is not None else {}), **metadata}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def resume_may_differ(default: Any, rule: Range | Rule | None = None) -> Any:
    """A field that may change when a run is resumed because it cannot change the result (a folder's location)."""
    return _field(default, rule, **{RESUME_MAY_DIFFER_KEY: True})


def ranged(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Any:
    """A field whose value lies from ``low`` to ``high`` (inclusive unless ``*_open``)."""
    return _field(default, Range(low, high, low_open, high_open))


def positive(default: Any) -> Any:
    """A field whose value is > 0 (learning rates, temperatures)."""
    return ranged(default, 0, low_open=True)


def non_negative(default: Any) -> Any:
    """A field whose value is >= 0."""
    return ranged(default, 0)


def probability(default: Any) -> Any:
    """A field whose value lies in [0, 1]."""
    return ranged(default, 0, 1)


def checked(default: Any, rule: Rule) -> Any:
    """A field checked by any ``Rule``."""
    return _field(default, rule)


NON_EMPTY = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "", good=("x",), bad=("", " "))
# A run name is one folder below <output_root>/<method>/<dataset>/: a separator or ".." would put the run (and
# its overwrite=true) somewhere else.
PATH_NAME = Rule("a folder name without '/', '\\' or '..'",
                 lambda v: isinstance(v, str) and v.strip() not in ("", ".", "..") and not re.search(r"[/\\]", v)
                 and "\x00" not in v, good=("run 1", "é"), bad=("", "..", "a/b", "../x"))
DEVICE = Rule("auto, cpu, cuda or cuda:N",
              lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v.strip().lower()) is not None,
              good=("auto", "cpu", "cuda:1"), bad=("gpu", "cuda:x", ""))


def non_empty(default: str) -> Any:
    return checked(default, NON_EMPTY)


def field_rule(cls: type, name: str) -> Range | Rule | None:
    """The rule of field ``name``: its own, else the nearest base class's (a redeclared default keeps the rule)."""
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and RULE_KEY in field.metadata:
            return field.metadata[RULE_KEY]
    return None


def _values(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def check_config(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first value of ``cfg`` (or of its nested sections) outside its valid range."""
    for field in dataclasses.fields(cfg):
        value, key = getattr(cfg, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_config(value, key + ".")
            continue
        if _non_finite(value) and not (isinstance(value, float) and value == field.default):  # an inf default is meant
            raise ConfigError(f"Config key {key!r} = {value!r} is not a finite number; give a finite value.")
        rule = field_rule(type(cfg), field.name)
        if rule is None or value is None:
            continue
        for item in _values(value) if isinstance(rule, Range) else [value]:
            if not _passes(rule, item):
                shown = f"{value!r}" if item is value else f"{value!r} (element {item!r})"
                what = f"is out of range; valid range: {rule.describe()}" if isinstance(rule, Range) else \
                    f"is not valid; {rule.reason(item).rstrip('.')}"
                raise ConfigError(f"Config key {key!r} = {shown} {what}.")


def _passes(rule: Range | Rule, value: Any) -> bool:
    try:
        return rule.ok(value)
    except ValueError:
        return False


__all__ = ["RULE_KEY", "RESUME_MAY_DIFFER_KEY", "Range", "Rule", "NON_EMPTY", "PATH_NAME", "DEVICE", "ranged",
           "positive", "non_negative", "probability", "checked", "non_empty", "resume_may_differ", "field_rule",
           "check_config"]
