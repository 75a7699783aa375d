"""Every key and option an error message advises exists: `key=` advice names a config key (of any method's config,
dotted into nested sections) or a keyword of the Python function the message is about; `--option` advice names an
option some command-line tool defines. The source is scanned, so new methods' messages are checked too."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {"tests", ".venv", ".git", "docs"}
KEY_ADVICE = re.compile(r"(?<![\w.\-=!<>/?&])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(?!=)")
OPTION_ADVICE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# Python keywords a message may advise, with the functions they belong to (each must accept it).
API_KEYWORDS = {
    "weights_only": ["torch.load"],
    "on_bad": ["shared.data.base:SegmentationDataset"],
    "n_classes": ["shared.data.folder:FolderDataset", "shared.evaluation:evaluate_head"],
    "k": ["shared.data.knn:load_or_compute_knn", "baselines.kmeans.kmeans:cosine_kmeans"],
    "n": ["dinov2_patched.vision_transformer:VisionTransformer.get_intermediate_layers"],
    "features": ["shared.backbone:build_backbone"],
    "layer": ["shared.backbone:build_backbone"],
    "optimizers": ["shared.checkpoint:make_checkpoint"],
    "n_clusters": ["shared.evaluation:evaluate_head"],
    "n_colors": ["shared.viz:palette_for"],
}
PLACEHOLDERS = {"key"}  # "key=value": the form of an override, not a key
BUILTIN_OPTIONS = {"--config", "--resume", "--debug", "--help"}  # shared.config.parse_args and shared.cli


def source_files() -> list[Path]:
    return [p for p in sorted(REPO.rglob("*.py")) if not SKIP_DIRS & set(p.relative_to(REPO).parts)]


def _strings(node: ast.AST) -> str:
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def messages(tree: ast.AST):
    """(line, text) of every raised exception and every warn(...) / fail(...) call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            yield node.lineno, _strings(node.exc)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("warn", "fail"):
                yield node.lineno, _strings(node)


def config_keys() -> set[str]:
    """Every dotted key of every method's CONFIG_CLASS (method directories found like the contract test)."""
    keys: set[str] = set()

    def visit(cls: type, prefix: str) -> None:
        for field in dataclasses.fields(cls):
            keys.add(prefix + field.name)
            sub = field.type if isinstance(field.type, type) else None
            default = getattr(cls, field.name, None) if field.default is dataclasses.MISSING else field.default
            sub = type(default) if dataclasses.is_dataclass(default) else sub
            if sub is not None and dataclasses.is_dataclass(sub):
                visit(sub, f"{prefix}{field.name}.")

    for parent in (REPO, REPO / "baselines"):
        for path in sorted(parent.iterdir()):
            if (path / "train.py").is_file():
                module = importlib.import_module(".".join(path.relative_to(REPO).parts) + ".train")
                if hasattr(module, "CONFIG_CLASS"):
                    visit(module.CONFIG_CLASS, "")
    return keys


def cli_options() -> set[str]:
    found = set(BUILTIN_OPTIONS)
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                found.update(a.value for a in node.args
                             if isinstance(a, ast.Constant) and str(a.value).startswith("--"))
    return found


def resolve(target: str):
    module_name, _, attr = target.partition(":")
    if not attr:
        module_name, _, attr = target.rpartition(".")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def advice() -> list[tuple[str, str, str]]:
    """(where, kind, name) of every key / option an error message names."""
    found = []
    for path in source_files():
        for line, text in messages(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(REPO)}:{line}"
            found += [(where, "key", m.group(1)) for m in KEY_ADVICE.finditer(text)]
            found += [(where, "option", m.group(1)) for m in OPTION_ADVICE.finditer(text)]
    return found


def test_the_scanner_finds_advice_in_error_messages():
    tree = ast.parse('raise ValueError(f"bad; pass lr_head={x} or " "--resume auto")\nwarnings.warn("use n_bins=3")')
    texts = [text for _, text in messages(tree)]
    assert [m.group(1) for t in texts for m in KEY_ADVICE.finditer(t)] == ["lr_head", "n_bins"]
    assert [m.group(1) for t in texts for m in OPTION_ADVICE.finditer(t)] == ["--resume"]
    assert not KEY_ADVICE.search("a == b, a != b, a <= b, https://x/?q=1")


def make_variables() -> set[str]:
    """Variables the Makefile reads (`make eval RUN=...`): advice may name them too."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Z][A-Z0-9_]*) \?=", text, flags=re.MULTILINE))


def test_every_advised_key_and_option_exists():
    keys, options = config_keys() | make_variables(), cli_options()
    assert {"backbone_weights", "max_steps", "n_clusters", "lr_head"} <= keys  # the scan reaches the methods
    missing = []
    for where, kind, name in advice():
        if kind == "option":
            if name not in options:
                missing.append(f"{where}: {name}")
        elif name not in keys and name not in PLACEHOLDERS and name not in API_KEYWORDS:
            missing.append(f"{where}: {name}=")
    assert not missing, "error messages advise keys or options that do not exist: " + ", ".join(missing)


@pytest.mark.parametrize("key", sorted(API_KEYWORDS))
def test_python_keywords_that_messages_advise_are_accepted(key):
    for target in API_KEYWORDS[key]:
        assert key in inspect.signature(resolve(target)).parameters, f"{target} has no parameter {key!r}"


def test_the_advice_that_was_wrong_is_gone():
    texts = " ".join(text for path in source_files() for _, text in messages(ast.parse(path.read_text())))
    assert "on_bad='skip'" not in texts and "weights='none'" not in texts
    assert "pass n_classes= to build_dataset" not in texts.replace("you may pass n_classes= to build_dataset", "")
