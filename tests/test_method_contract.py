"""The contract every method keeps, checked on its tiny config (timm's model tests are the model).

A method is a directory (top level or under baselines/) with `train.py` (defining `CONFIG_CLASS` and `main`) and
`configs/tiny.yaml`; new methods are picked up without editing this file. For each one:

- the tiny config trains (two steps where the method has steps);
- every parameter of every optimizer receives a finite gradient at least once, and no gradient is ever non-finite;
- the export reloads and equals the in-memory head (`FinishedRun.head`) on random features of another size;
- a run stopped after one step and resumed equals an uninterrupted run (same exported outputs).

A method whose tiny config names `base_segmenter: run:<other>` gets `<other>`'s tiny run trained first.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from shared.config import load_config
from shared.segmenter import load

REPO = Path(__file__).resolve().parents[1]


def method_dirs() -> dict[str, Path]:
    """{method name: directory} of every directory holding train.py and configs/tiny.yaml."""
    found = {}
    for parent in (REPO, REPO / "baselines"):
        for path in sorted(parent.iterdir()):
            if (path / "train.py").is_file() and (path / "configs" / "tiny.yaml").is_file():
                found[path.name] = path
    return found


METHODS = method_dirs()


def module_of(method: str):
    path = METHODS[method].relative_to(REPO)
    return importlib.import_module(".".join(path.parts) + ".train")


def tiny_base(method: str) -> str:
    value = str((yaml.safe_load((METHODS[method] / "configs" / "tiny.yaml").read_text()) or {}).get(
        "base_segmenter", "") or "")
    return value[len("run:"):].split("/")[0] if value.startswith("run:") else ""


def tiny_config(method: str, root: Path, name: str, device: str = "cpu", **overrides):
    module = module_of(method)
    items = [f"output_root={root / 'runs'}", f"cache_dir={root / 'cache'}", f"name={name}", f"device={device}"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(module.CONFIG_CLASS, METHODS[method] / "configs" / "tiny.yaml", items)


class GradientWatch:
    """A global optimizer pre-step hook recording, per parameter, whether a finite gradient was ever seen."""

    def __init__(self) -> None:
        self.params: dict[int, tuple[torch.nn.Parameter, str]] = {}
        self.finite_once: set[int] = set()
        self.non_finite: list[str] = []

    def __call__(self, optimizer, args, kwargs) -> None:
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                name = f"{type(optimizer).__name__}[{g}][{i}] {tuple(p.shape)}"
                self.params.setdefault(id(p), (p, name))
                if p.grad is None:
                    continue
                if torch.isfinite(p.grad).all():
                    self.finite_once.add(id(p))
                else:
                    self.non_finite.append(name)

    def missing(self) -> list[str]:
        return [name for key, (_, name) in self.params.items() if key not in self.finite_once]


@pytest.fixture(scope="module")
def world(tmp_path_factory, test_device):
    """One root for all methods' tiny runs (feature caches are shared), plus the bases trained on demand."""
    root = tmp_path_factory.mktemp("contract")
    trained: dict[str, object] = {}

    def train(method: str, name: str = "tiny", **overrides):
        base = tiny_base(method)
        if base:
            if ("base", base) not in trained:
                trained[("base", base)] = module_of(base).main(tiny_config(base, root, "base", test_device))
            overrides.setdefault("base_segmenter", str(trained[("base", base)].export_path))
        finished = module_of(method).main(tiny_config(method, root, name, test_device, **overrides))
        trained[(method, name)] = finished
        return finished

    return root, train, trained


def random_features(meta: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, meta["feature_dim"], 5, 7, generator=generator)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_contract(method, world):
    root, train, _ = world
    watch = GradientWatch()
    handle = register_optimizer_step_pre_hook(watch)
    try:
        finished = train(method, name="full")
    finally:
        handle.remove()
    assert not watch.non_finite, f"{method}: non-finite gradients in {watch.non_finite[:3]}"
    assert not watch.missing(), f"{method}: parameters that never received a gradient: {watch.missing()[:5]}"

    segmenter = load(finished.export_path)
    x = random_features(segmenter.metadata)
    with torch.no_grad():
        device = next(iter(finished.head.parameters()), torch.zeros(0)).device
        reloaded, in_memory = segmenter(x), {k: v.cpu() for k, v in finished.head.eval()(x.to(device)).items()}
    assert set(reloaded) == set(in_memory)
    for key in in_memory:
        torch.testing.assert_close(reloaded[key], in_memory[key], rtol=1e-5, atol=1e-5, msg=f"{method}: {key}")
    assert (finished.export_path.parent.parent / "final_metrics.json").is_file()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resumed_run_equals_uninterrupted(method, world):
    root, train, trained = world
    module = module_of(method)
    has_steps = "max_steps" in module.CONFIG_CLASS.__dataclass_fields__
    # The contract test's run is the uninterrupted one (the tiny configs train for max_steps=2).
    uninterrupted = trained.get((method, "full")) or train(method, name="full")
    if has_steps:
        assert tiny_config(method, root, "full").max_steps == 2, "tiny.yaml must set max_steps: 2"
        train(method, name="resumed", max_steps=1)
        resumed = train(method, name="resumed", max_steps=2, resume="auto")
    else:  # no training loop: running twice must give the same export
        resumed = train(method, name="resumed")
    a, b = load(uninterrupted.export_path), load(resumed.export_path)
    x = random_features(a.metadata)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    for key in out_a:
        torch.testing.assert_close(out_b[key], out_a[key], rtol=0, atol=1e-6, msg=f"{method}: {key}")
