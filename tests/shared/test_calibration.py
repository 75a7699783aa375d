"""Calibration and uncertainty metrics against naive formulas and sklearn."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from shared.calibration import (
    CalibrationAccumulator,
    UncertaintyAccumulator,
    plot_rejection_curve,
    reliability_diagram,
)


def naive_calibration(probs: np.ndarray, target: np.ndarray, n_bins: int = 15) -> dict:
    keep = (target >= 0) & (target < probs.shape[1])
    probs, target = probs[keep], target[keep]
    conf, pred = probs.max(1), probs.argmax(1)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if in_bin.any():
            gap = abs((pred[in_bin] == target[in_bin]).mean() - conf[in_bin].mean())
            ece += gap * in_bin.mean()
            mce = max(mce, gap)
    onehot = np.eye(probs.shape[1])[target]
    return {"ece": ece, "mce": mce, "nll": -np.log(probs[np.arange(len(target)), target]).mean(),
            "brier": ((probs - onehot) ** 2).sum(1).mean()}


def random_probs(rng, shape, temperature=1.0):
    logits = rng.normal(0, 2.0, shape) / temperature
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_calibration_matches_naive_formulas_in_two_batches():
    rng = np.random.default_rng(0)
    probs = random_probs(rng, (2, 4, 6, 5))  # (B, C, H, W)
    target = rng.integers(-1, 4, size=(2, 6, 5))
    acc = CalibrationAccumulator(n_bins=15)
    acc.update(torch.from_numpy(probs[:1]), torch.from_numpy(target[:1]))
    acc.update(torch.from_numpy(probs[1:]), torch.from_numpy(target[1:]))
    out = acc.all_reduce().compute()
    ref = naive_calibration(probs.transpose(0, 2, 3, 1).reshape(-1, 4), target.reshape(-1))
    for key in ("ece", "mce", "nll", "brier"):
        assert out[key] == pytest.approx(ref[key], abs=1e-9), key
    assert out["n_pixels"] == int((target >= 0).sum())
    assert sum(out["bins"]["count"]) == out["n_pixels"]


def test_calibration_with_cluster_mapping():
    rng = np.random.default_rng(1)
    probs = random_probs(rng, (200, 4))  # 4 clusters -> classes [1, 0, -1, 1]
    target = rng.integers(0, 2, size=200)
    mapping = [1, 0, -1, 1]
    class_probs = np.stack([probs[:, 1], probs[:, 0] + probs[:, 3], probs[:, 2]], axis=1)  # last column: "none"
    acc = CalibrationAccumulator(n_classes=2)
    acc.update(torch.from_numpy(probs), torch.from_numpy(target), mapping=mapping)
    out = acc.compute()
    pred = class_probs.argmax(1)
    assert out["accuracy"] == pytest.approx((pred == target).mean())
    assert out["nll"] == pytest.approx(-np.log(class_probs[np.arange(200), target]).mean())
    onehot = np.eye(3)[target]
    assert out["brier"] == pytest.approx(((class_probs - onehot) ** 2).sum(1).mean())
    ref = naive_calibration(class_probs, target)  # target never hits the "none" column
    assert out["ece"] == pytest.approx(ref["ece"], abs=1e-9)
    assert out["mce"] == pytest.approx(ref["mce"], abs=1e-9)


def test_auroc_matches_sklearn_and_rejection_curve_matches_sorting():
    rng = np.random.default_rng(2)
    n = 4000
    target = rng.integers(0, 3, size=n)
    wrong = rng.random(n) < 0.3
    pred = np.where(wrong, (target + 1) % 3, target)
    uncertainty = np.clip(rng.normal(0.4 + 0.25 * wrong, 0.15), 0, 1)
    target[:10] = -1  # ignored
    acc = UncertaintyAccumulator(n_bins=1000, value_range=(0.0, 1.0))
    acc.update(torch.from_numpy(uncertainty[:2000]), torch.from_numpy(pred[:2000]), torch.from_numpy(target[:2000]))
    acc.update(torch.from_numpy(uncertainty[2000:]), torch.from_numpy(pred[2000:]), torch.from_numpy(target[2000:]))
    out = acc.all_reduce().compute(fractions=[0.0, 0.1, 0.5])
    keep = target >= 0
    is_wrong = (pred != target)[keep]
    assert out["auroc"] == pytest.approx(roc_auc_score(is_wrong, uncertainty[keep]), abs=2e-3)
    order = np.argsort(uncertainty[keep], kind="stable")
    for f, a in zip(out["rejection"]["fraction"], out["rejection"]["accuracy"], strict=True):
        kept = order[: int(round((1 - f) * keep.sum()))]
        assert a == pytest.approx(1 - is_wrong[kept].mean(), abs=5e-3)
    assert out["rejection"]["accuracy"][2] > out["rejection"]["accuracy"][0]


def test_uncertainty_with_mapping_counts_unmatched_as_wrong():
    acc = UncertaintyAccumulator(n_bins=10)
    pred = torch.tensor([0, 1, 2, 2])
    target = torch.tensor([1, 0, 0, 1])
    acc.update(torch.tensor([0.05, 0.15, 0.95, 0.85]), pred, target, mapping=[1, 0, -1])
    out = acc.compute()
    assert out["accuracy"] == 0.5 and out["auroc"] == 1.0


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(3)
    cal = CalibrationAccumulator()
    cal.update(torch.from_numpy(random_probs(rng, (100, 3))), torch.from_numpy(rng.integers(0, 3, 100)))
    reliability_diagram(cal.compute(), tmp_path / "rel.png")
    unc = UncertaintyAccumulator()
    unc.update(torch.rand(50), torch.randint(0, 2, (50,)), torch.randint(0, 2, (50,)))
    plot_rejection_curve(unc.compute(), tmp_path / "rej.png")
    for name in ("rel.png", "rej.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size == (400, 400)
