"""Probes: losses, logits and gradients against float64 numpy formulas written out independently."""

import numpy as np
import pytest
import torch

from shared.probes import ClusterProbe, LinearProbe


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pixels(code: torch.Tensor) -> np.ndarray:
    """(B, D, h, w) -> (B*h*w, D) float64, pixel order b, y, x."""
    return code.detach().double().permute(0, 2, 3, 1).reshape(-1, code.shape[1]).numpy()


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D bilinear interpolation with half-pixel centres (align_corners=False):
    source coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0, the upper neighbour clamped at n_in - 1."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        weights[i, lo] += 1.0 - frac
        weights[i, hi] += frac
    return weights


def upsample(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, C, h, w) -> (B, C, H, W) bilinear, separable: rows then columns."""
    wy = bilinear_weights(x.shape[2], size[0])
    wx = bilinear_weights(x.shape[3], size[1])
    return np.einsum("Yy,bcyx,Xx->bcYX", wy, x, wx)


def test_bilinear_reference_reproduces_known_values():
    # 2 -> 4 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper neighbour clamped).
    assert np.allclose(upsample(np.array([[[[0.0, 4.0]]]]), (1, 4))[0, 0, 0], [0.0, 1.0, 3.0, 4.0])


@pytest.fixture
def cluster_case():
    torch.manual_seed(0)
    probe = ClusterProbe(code_dim=5, n_classes=3, n_extra=2).double()
    code = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    return probe, code


def test_cluster_probe_loss_and_logits_match_formula(cluster_case):
    probe, code = cluster_case
    loss, logits = probe(code)
    inner = unit_rows(pixels(code)) @ unit_rows(probe.centres.detach().numpy()).T  # (N, K')
    onehot = np.eye(5)[inner.argmax(axis=1)]
    assert logits.shape == (2, 5, 4, 3)
    assert np.allclose(pixels(logits), 2.0 * inner)  # default alpha = 2
    assert loss.item() == pytest.approx(-(onehot * inner).sum(axis=1).mean(), rel=1e-12)
    assert np.allclose(pixels(probe(code, alpha=4.0)[1]), 4.0 * inner)


def test_cluster_probe_gradient_matches_analytic(cluster_case):
    # d/dm_k of -1/N sum_{p: argmax = k} <c_p/|c_p|, m_k/|m_k|> = -1/N sum (ĉ_p - (ĉ_p·m̂_k) m̂_k) / |m_k|
    # (the argmax is piecewise constant, so it contributes no gradient).
    probe, code = cluster_case
    probe(code)[0].backward()
    c_hat = unit_rows(pixels(code))
    centres = probe.centres.detach().numpy()
    m_hat = unit_rows(centres)
    winner = (c_hat @ m_hat.T).argmax(axis=1)
    expected = np.zeros_like(centres)
    for k in range(len(centres)):
        mine = c_hat[winner == k]
        tangent = mine - (mine @ m_hat[k])[:, None] * m_hat[k]
        expected[k] = -tangent.sum(axis=0) / np.linalg.norm(centres[k]) / len(c_hat)
    assert np.allclose(probe.centres.grad.numpy(), expected, atol=1e-12)
    assert (winner != 4).any() and not np.allclose(expected, 0)  # a case where the gradient is not trivially 0


def test_cluster_probe_gradient_matches_finite_differences(cluster_case):
    probe, code = cluster_case
    code.requires_grad_(True)  # the loss is also differentiable in the code (callers detach it)
    assert torch.autograd.gradcheck(lambda m, c: torch.func.functional_call(probe, {"centres": m}, (c,))[0],
                                    (probe.centres.detach().clone().requires_grad_(True), code))


@pytest.fixture
def linear_case():
    torch.manual_seed(0)
    probe = LinearProbe(code_dim=4, n_classes=3).double()
    code = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    labels = torch.randint(-1, 3, (2, 7, 5))  # 3x3 -> 7x5: non-integer scale factors in both directions
    labels[0, 0, 0] = 7  # out of range: ignored like -1
    labels[1, 2, 3] = 255
    return probe, code, labels


def linear_reference(probe: LinearProbe, code: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy over valid pixels, and its gradient in W, b, from numpy upsampling of the code.

    A 1x1 convolution commutes with bilinear interpolation, so logits_up = W · up(code) + b, and for the mean
    cross-entropy dL/dW = mean_p (softmax_p - onehot_p) up(code)_p^T, dL/db = mean_p (softmax_p - onehot_p).
    """
    weight = probe.conv.weight.detach().numpy()[:, :, 0, 0]  # (K, D)
    bias = probe.conv.bias.detach().numpy()
    up_code = pixels(torch.from_numpy(upsample(code.detach().numpy(), tuple(labels.shape[-2:]))))  # (N, D)
    flat = labels.reshape(-1).numpy()
    valid = (flat >= 0) & (flat < 3)
    z = up_code[valid] @ weight.T + bias
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    onehot = np.eye(3)[flat[valid]]
    loss = -(onehot * log_p).sum(axis=1).mean()
    residual = (np.exp(log_p) - onehot) / valid.sum()
    return loss, residual.T @ up_code[valid], residual.sum(axis=0)


def test_linear_probe_loss_and_gradient_match_manual_upsampling(linear_case):
    probe, code, labels = linear_case
    loss = probe.loss(probe(code), labels)
    loss.backward()
    ref_loss, ref_dw, ref_db = linear_reference(probe, code, labels)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert np.allclose(probe.conv.weight.grad.numpy()[:, :, 0, 0], ref_dw, atol=1e-12)
    assert np.allclose(probe.conv.bias.grad.numpy(), ref_db, atol=1e-12)


def test_linear_probe_logits_are_the_1x1_convolution(linear_case):
    probe, code, _ = linear_case
    weight = probe.conv.weight.detach().numpy()[:, :, 0, 0]
    expected = pixels(code) @ weight.T + probe.conv.bias.detach().numpy()
    assert np.allclose(pixels(probe(code)), expected)


@pytest.mark.parametrize("fill", [-1, 3, 255])
def test_linear_probe_all_ignored_returns_zero_with_a_gradient_path(linear_case, fill):
    probe, code, _ = linear_case
    code.requires_grad_(True)
    loss = probe.loss(probe(code), torch.full((2, 7, 5), fill))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # a step with no labelled pixel must not break the shared backward of the training loop
    for grad in (probe.conv.weight.grad, probe.conv.bias.grad, code.grad):
        assert grad is not None and torch.count_nonzero(grad) == 0
