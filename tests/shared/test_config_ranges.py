"""Valid ranges of config values: table-driven over every key that declares one, in RunConfig and in every method's
config (found like the contract test, so new methods' keys are covered without editing this file)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from pathlib import Path

import pytest

from shared.config import ConfigError, load_config
from shared.config_ranges import Range, Rule, check_config, field_rule, positive, ranged
from shared.run_config import RunConfig

REPO = Path(__file__).resolve().parents[2]


def config_classes() -> dict[str, type]:
    found = {"RunConfig": RunConfig}
    for parent in (REPO, REPO / "baselines"):
        for path in sorted(parent.iterdir()):
            if (path / "train.py").is_file():
                module = importlib.import_module(".".join(path.relative_to(REPO).parts) + ".train")
                if hasattr(module, "CONFIG_CLASS"):
                    found[path.name] = module.CONFIG_CLASS
    return found


def ranged_keys(cls: type, prefix: str = "") -> list[tuple[str, type, object]]:
    """(dotted key, annotation, rule) of every field with a rule, nested sections included."""
    hints, out = typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            out += ranged_keys(tp, f"{prefix}{field.name}.")
            continue
        rule = field_rule(cls, field.name)
        if rule is not None:
            out.append((prefix + field.name, tp, rule))
    return out


def is_integer(tp) -> bool:
    args = typing.get_args(tp)
    return tp is int or int in args or any(typing.get_args(a) == (int, ...) for a in args) or \
        (typing.get_origin(tp) in (list, tuple) and int in args)


CASES = [(name, key, tp, rule) for name, cls in config_classes().items() for key, tp, rule in ranged_keys(cls)]


def test_the_table_covers_the_shared_and_the_methods_keys():
    keys = {(name, key) for name, key, _, _ in CASES}
    assert {("RunConfig", "val_batch_size"), ("stego", "lr_head"), ("stego", "dropout"), ("kmeans", "n_clusters"),
            ("kmeans", "val_resolution"), ("RunConfig", "name")} <= keys  # kmeans redeclares val_resolution


def _override(key: str, value) -> str:
    return f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"


@pytest.mark.parametrize(("name", "key", "tp", "rule"), CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_every_ranged_key_accepts_its_bounds_and_refuses_just_outside(name, key, tp, rule, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be created on disk while a config is parsed
    cls = config_classes()[name]
    good, bad = rule.examples(is_integer(tp))
    assert bad, f"{name}.{key}: a rule without an invalid example cannot be tested"
    for value in good:
        assert getattr(load_config(cls, None, [_override(key, value)]), key.split(".")[-1]) is not None
    for value in bad:
        with pytest.raises(ConfigError) as error:
            load_config(cls, None, [_override(key, value)])
        message = str(error.value)
        assert repr(key) in message and rule.describe() in message, message
        assert repr(value) in message or str(value) in message, message
    assert list(tmp_path.iterdir()) == []


def test_a_yaml_value_out_of_range_names_the_key_value_and_range(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("val_every: 0\n")
    with pytest.raises(ConfigError, match=r"^Config key 'val_every' = 0 is out of range; valid range: >= 1\.$"):
        load_config(RunConfig, cfg)


@pytest.mark.parametrize("text", ["nan", ".inf", "-.inf", "1e999"])
def test_every_float_must_be_finite_even_without_a_range(text):
    with pytest.raises(ConfigError, match=r"'shift' = .* is not a finite number"):
        load_config(Free, None, [f"shift={text}"])


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="'log_every' = 0"):
        RunConfig(log_every=0)


@dataclasses.dataclass
class Section:
    lr: float = positive(0.1)


@dataclasses.dataclass
class Child(RunConfig):
    val_every: int = 7  # new default, same rule as RunConfig's
    opt: Section = dataclasses.field(default_factory=Section)


@dataclasses.dataclass
class Free:
    shift: float = 0.1


@dataclasses.dataclass
class InfDefault:
    max_norm: float = math.inf


@dataclasses.dataclass
class Layers:
    layers: list[int] = ranged([1, 2], low=0)


def test_a_redeclared_default_keeps_the_base_rule_and_a_nested_section_is_checked():
    assert field_rule(Child, "val_every") == Range(1)
    with pytest.raises(ConfigError, match="'val_every' = 0"):
        load_config(Child, None, ["val_every=0"])
    with pytest.raises(ConfigError, match=r"'opt\.lr' = -1\.0 is out of range; valid range: > 0"):
        load_config(Child, None, ["opt.lr=-1"])


def test_lists_are_checked_element_by_element():
    assert load_config(Layers, None, ["layers=[0, 5]"]).layers == [0, 5]
    with pytest.raises(ConfigError, match=r"'layers' = \[3, -1\] \(element -1\) is out of range"):
        load_config(Layers, None, ["layers=[3, -1]"])


def test_range_and_rule_descriptions():
    assert Range(0, 1, high_open=True).describe() == "[0, 1)"
    assert Range(0, low_open=True).describe() == "> 0"
    assert Range(high=5).describe() == "<= 5"
    assert not Range(0, 1).ok(float("nan")) and not Range(0).ok(True)
    assert Range(1).examples(True) == ([1], [0])
    good, bad = Range(0, 1, low_open=True).examples(False)
    assert good[0] > 0 and bad == [0, 1.001] and math.isclose(good[1], 1)
    rule = Rule("even", lambda v: v % 2 == 0, good=(2,), bad=(3,))
    assert rule.ok(2) and not rule.ok(3) and rule.examples(True) == ([2], [3])


def test_check_config_passes_the_defaults_of_every_config():
    for cls in config_classes().values():
        check_config(cls())


def test_an_infinite_default_is_kept_but_not_given_elsewhere():
    assert load_config(InfDefault).max_norm == math.inf
    assert load_config(InfDefault, None, ["max_norm=.inf"]).max_norm == math.inf  # the default itself
    with pytest.raises(ConfigError, match="'max_norm' = nan is not a finite number"):
        load_config(InfDefault, None, ["max_norm=nan"])
