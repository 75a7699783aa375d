"""shared.config: YAML + key=value overrides onto typed dataclasses, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from shared.config import (
    ConfigError,
    config_to_dict,
    git_commit,
    git_dirty,
    load_config,
    parse_args,
    save_resolved_config,
)


@dataclass
class Optim:
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    kind: Literal["adam", "sgd"] = "adam"


@dataclass
class Model:
    dim: int = 70
    layers: list[int] = field(default_factory=lambda: [1, 2])
    optim: Optim = field(default_factory=Optim)


@dataclass
class Cfg:
    name: str = "run"
    output_root: str = "runs"
    seed: int = 0
    deterministic: bool = False
    resume: str = ""
    device: str = "auto"
    data_root: str = ""
    crop: Optional[int] = None  # noqa: UP045 - the typing.Optional spelling must work too
    tags: list[str] = field(default_factory=list)
    model: Model = field(default_factory=lambda: Model(dim=90))


@dataclass
class Required:
    n_classes: int


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_yaml_then_cli_precedence(tmp_path):
    path = write_yaml(tmp_path, "seed: 3\nname: fromyaml\nmodel:\n  optim:\n    lr: 0.5\n")
    cfg = parse_args(Cfg, ["--config", str(path), "seed=7"])
    assert cfg.seed == 7  # CLI beats YAML
    assert cfg.name == "fromyaml"
    assert cfg.model.optim.lr == 0.5
    assert cfg.model.dim == 90  # a partial nested section keeps the parent's default (not Model's own 70)
    assert cfg.model.optim.kind == "adam"


def test_dotted_keys_reach_nested_dataclasses():
    cfg = parse_args(Cfg, ["model.dim=12", "model.optim.kind=sgd", "model.layers=[3, 4, 5]"])
    assert cfg.model.dim == 12 and cfg.model.optim.kind == "sgd" and cfg.model.layers == [3, 4, 5]
    assert isinstance(cfg.model, Model) and isinstance(cfg.model.optim, Optim)


def test_unknown_cli_key_names_key_and_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"'model\.dimm'.*valid keys under 'model' are: dim, layers, optim"):
        parse_args(Cfg, ["model.dimm=3"])
    with pytest.raises(ConfigError, match=r"'sead'.*data_root.*seed"):
        parse_args(Cfg, ["sead=3"])


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "model:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, path)
    assert "'model.optim.lrr'" in str(err.value) and str(path) in str(err.value)
    assert "betas, kind, lr" in str(err.value)


def test_wrong_type_names_key_value_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'seed' expects int but got 'abc'"):
        parse_args(Cfg, ["seed=abc"])
    with pytest.raises(ConfigError, match=r"'seed' expects int but got 1\.5"):
        parse_args(Cfg, ["seed=1.5"])
    path = write_yaml(tmp_path, "model:\n  dim: [1]\n")
    with pytest.raises(ConfigError, match=r"'model\.dim' expects int.*" + str(path).replace(".", r"\.")):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"'model\.optim\.kind' expects Literal\['adam', 'sgd'\] but got 'adamw'"):
        parse_args(Cfg, ["model.optim.kind=adamw"])
    with pytest.raises(ConfigError, match=r"'model\.layers' expects list\[int\] but got \[1, 'x'\]"):
        parse_args(Cfg, ["model.layers=[1, x]"])
    with pytest.raises(ConfigError, match=r"'model\.optim\.betas' expects tuple"):
        parse_args(Cfg, ["model.optim.betas=[0.9]"])  # wrong length


def test_bool_parsing():
    for text, expected in [("true", True), ("True", True), ("yes", True), ("false", False), ("off", False)]:
        assert parse_args(Cfg, [f"deterministic={text}"]).deterministic is expected
    for text in ("1", "0", "maybe", ""):
        with pytest.raises(ConfigError, match="'deterministic' expects bool"):
            parse_args(Cfg, [f"deterministic={text}"])


def test_numbers_strings_optional_and_lists():
    cfg = parse_args(Cfg, ["model.optim.lr=1e-4", "name=007", "crop=224", "tags=[a, b]", "model.optim.betas=[0, 1]"])
    assert cfg.model.optim.lr == pytest.approx(1e-4) and isinstance(cfg.model.optim.lr, float)  # YAML 1.1: str
    assert cfg.name == "007"  # str fields keep the raw text
    assert cfg.crop == 224 and cfg.tags == ["a", "b"]
    assert cfg.model.optim.betas == (0.0, 1.0) and isinstance(cfg.model.optim.betas, tuple)
    assert isinstance(parse_args(Cfg, ["model.optim.lr=2"]).model.optim.lr, float)  # int accepted for float
    assert parse_args(Cfg, ["crop=null"]).crop is None
    assert parse_args(Cfg, ["name=true"]).name == "true"
    assert parse_args(Cfg, ["data_root="]).data_root == ""


def test_resume_flag_and_config_flag_forms(tmp_path):
    path = write_yaml(tmp_path, "seed: 5\n")
    assert parse_args(Cfg, ["--resume", "auto"]).resume == "auto"
    cfg = parse_args(Cfg, [f"--config={path}", "--resume=runs/x/last.pt", "resume=ignored-because-flag-wins"])
    assert cfg.seed == 5 and cfg.resume == "runs/x/last.pt"
    with pytest.raises(ConfigError, match="--resume needs a value"):
        parse_args(Cfg, ["--resume"])
    with pytest.raises(ConfigError, match="has no `resume` field"):
        parse_args(Required, ["n_classes=3", "--resume", "auto"])


def test_malformed_arguments():
    with pytest.raises(ConfigError, match="Unknown option '--lr'"):
        parse_args(Cfg, ["--lr", "3"])
    with pytest.raises(ConfigError, match="'seed' is not of the form key=value"):
        parse_args(Cfg, ["seed"])
    with pytest.raises(ConfigError, match="'name' is not a nested config section"):
        parse_args(Cfg, ["name.x=1"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = write_yaml(tmp_path, "seed: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(Cfg, bad)
    dup = write_yaml(tmp_path, "seed: 1\nname: a\nseed: 2\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*Duplicated key 'seed' at line 3"):
        load_config(Cfg, dup)
    listy = write_yaml(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Cfg, listy)
    assert load_config(Cfg, write_yaml(tmp_path, "", "empty.yaml")) == Cfg()


def test_missing_required_field():
    with pytest.raises(ConfigError, match="'n_classes' has no default"):
        parse_args(Required, [])
    assert parse_args(Required, ["n_classes=27"]).n_classes == 27


def test_save_resolved_config_round_trip(tmp_path):
    cfg = parse_args(Cfg, ["seed=9", "model.optim.betas=[0.5, 0.6]", "crop=32"])
    path = save_resolved_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["seed"] == 9 and data["model"]["optim"]["betas"] == [0.5, 0.6]
    assert data["git_commit"] == git_commit() and data["git_dirty"] == git_dirty()
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert load_config(Cfg, path) == cfg  # a saved config can be fed back to --config


def test_config_to_dict_is_plain():
    data = config_to_dict(Cfg())
    assert data["model"]["optim"] == {"lr": 0.1, "betas": [0.9, 0.999], "kind": "adam"}
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_git_commit_outside_a_repository(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    assert git_dirty(tmp_path) is None
    commit = git_commit()
    assert commit == "unknown" or len(commit) == 40


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(Cfg, ["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "model.optim.lr: float = 0.1" in out and "seed: int = 0" in out and "--resume" in out
    assert "model.dim: int = 90" in out  # the parent's default for the section, not Model's own 70
