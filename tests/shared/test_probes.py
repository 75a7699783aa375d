"""Probes against explicit float64 formulas."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.probes import ClusterProbe, LinearProbe


def test_cluster_probe_matches_formula():
    torch.manual_seed(0)
    probe = ClusterProbe(code_dim=5, n_classes=3, n_extra=2).double()
    code = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    loss, logits = probe(code)
    assert logits.shape == (2, 5, 4, 3)
    c = code.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    m = probe.centres.detach().numpy()
    inner = (c / np.linalg.norm(c, axis=1, keepdims=True)) @ (m / np.linalg.norm(m, axis=1, keepdims=True)).T
    assert np.allclose(logits.permute(0, 2, 3, 1).reshape(-1, 5).detach().numpy(), 2.0 * inner)
    assert loss.item() == pytest.approx(-inner.max(axis=1).mean())
    _, logits4 = probe(code, alpha=4.0)
    assert torch.allclose(logits4, 2.0 * logits)


def test_cluster_probe_loss_moves_centres_towards_codes():
    torch.manual_seed(0)
    probe = ClusterProbe(code_dim=4, n_classes=2)
    code = torch.randn(1, 4, 3, 3)
    loss, _ = probe(code)
    loss.backward()
    assert probe.centres.grad is not None and probe.centres.grad.abs().sum() > 0
    with torch.no_grad():
        before = probe.inner(code).amax(dim=1).mean()
        probe.centres -= 0.1 * probe.centres.grad  # one descent step: each code's best cosine must rise
        assert probe.inner(code).amax(dim=1).mean() > before


def test_linear_probe_loss_ignores_unlabelled_pixels():
    torch.manual_seed(0)
    probe = LinearProbe(code_dim=4, n_classes=3)
    code = torch.randn(2, 4, 3, 3)
    labels = torch.randint(-1, 3, (2, 6, 6))
    labels[0, 0, 0] = 7  # out of range: ignored like -1
    logits = probe(code)
    up = F.interpolate(logits, size=(6, 6), mode="bilinear", align_corners=False)
    logp = up.log_softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, 3)
    flat = labels.reshape(-1)
    valid = (flat >= 0) & (flat < 3)
    ref = -logp[valid, flat[valid]].mean()
    assert probe.loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-5)
    zero = probe.loss(logits, torch.full((2, 6, 6), -1))
    assert zero.item() == 0.0
    zero.backward()
