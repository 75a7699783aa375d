"""Every method's per-dataset YAML loads through its config class and lists only what differs from the defaults.

A key repeated with its default value hides which values a dataset really changes, and goes stale silently when
the default moves. `tiny.yaml` and `demo.yaml` are run recipes, not dataset settings, and are not checked here.
Methods are found as in the contract test, so a new method's files are checked without editing this file.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from shared.config import load_config
from tests.test_method_contract import METHODS, module_of

RECIPES = {"tiny", "demo"}

DATASET_FILES = [(method, path) for method, directory in METHODS.items()
                 for path in sorted((directory / "configs").glob("*.yaml")) if path.stem not in RECIPES]


def test_every_method_has_per_dataset_files():
    methods_with_files = {method for method, _ in DATASET_FILES}
    missing = set(METHODS) - methods_with_files
    assert not missing, f"methods without a per-dataset YAML: {sorted(missing)}"


@pytest.mark.parametrize(("method", "path"), DATASET_FILES, ids=[f"{m}-{p.stem}" for m, p in DATASET_FILES])
def test_per_dataset_file_lists_only_what_differs(method, path):
    config_class = module_of(method).CONFIG_CLASS
    defaults = dataclasses.asdict(config_class())
    written = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(written) - set(defaults))
    assert not unknown, f"{path.name}: keys {unknown} are not fields of {config_class.__name__}"
    repeated = sorted(key for key, value in written.items() if defaults[key] == value)
    assert not repeated, f"{path.name} repeats the defaults of {config_class.__name__}: {repeated}"
    load_config(config_class, path)  # and the file is a valid config (ranges, types)
