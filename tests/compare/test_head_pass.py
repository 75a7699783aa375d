"""compare.head_pass and compare.measure: uncertainty maps, class probabilities, peak memory."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compare.head_pass import class_probabilities, head_pass
from compare.measure import PeakMemory


class FakeHead(torch.nn.Module):
    """features (B, 2, 1, 1) -> cluster logits = the features; optionally a variance output = 2 x features[:, :1]."""

    def __init__(self, with_variance: bool) -> None:
        super().__init__()
        self.with_variance = with_variance

    def forward(self, x: torch.Tensor) -> dict:
        out = {"code": x, "cluster_logits": x, "linear_logits": None}
        if self.with_variance:
            out["variance"] = 2 * x[:, :1] + torch.arange(2.0).view(1, 1, 1, 2)  # varies along the width
        return out


def _features(values: list[list[float]], width: int = 2) -> SimpleNamespace:
    feats = np.asarray(values, dtype=np.float16)[:, :, None, None].repeat(width, axis=3)  # (N, 2, 1, W)
    return SimpleNamespace(features=feats, labels=np.zeros((len(values), 1, width), dtype=np.int16))


def _run(head, feats, probabilistic):
    options = SimpleNamespace(n_classes=2, device="cpu", batch_size=2)
    return head_pass(head, feats, None, [0, 1], options, [0, 1], probabilistic=probabilistic)


def test_probabilistic_uncertainty_is_one_minus_max_class_probability():
    logits = [[0.0, 0.0], [2.0, 0.0]]
    out = _run(FakeHead(False), _features(logits), probabilistic=True)
    top = torch.softmax(torch.tensor(logits), 1).max(1).values.numpy()
    np.testing.assert_allclose(out.uncertainty[:, 0, 0], 1 - top, rtol=1e-5)
    assert out.predictions.tolist() == [[[0, 0]], [[0, 0]]]


def test_deterministic_methods_have_no_uncertainty_map():
    # The variance branch is checked on an exported program in test_compare_run.test_exported_variance_...
    assert _run(FakeHead(False), _features([[1.0, 0.0]]), probabilistic=False).uncertainty is None


def test_class_probabilities_sum_clusters_and_keep_unmatched_mass_apart():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).view(1, 3, 1, 1)
    probs = class_probabilities(logits, [1, -1, 1], n_classes=2)[0, :, 0, 0]
    assert probs.tolist() == pytest.approx([0.0, 0.7, 0.3])


def test_peak_memory_sees_a_large_temporary_allocation():
    from compare.measure import _reset_rss_peak

    if not _reset_rss_peak():
        pytest.skip("this kernel does not let a process reset its peak RSS; the fallback is only a lower bound")
    peak = PeakMemory("cpu")
    with peak.measure():
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, written so every page is resident
        del block
    assert peak.mib >= 48
