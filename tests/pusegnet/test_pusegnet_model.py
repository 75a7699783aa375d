"""The SNGP head against independent references: SVD, the RBF kernel, a direct precision formula, the
mean-field formula; distance awareness on 2-D data; export with dynamic shapes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from pusegnet.model import (
    BoundedSpectralConv,
    LaplacePrecision,
    PusegnetEvalHead,
    PusegnetHead,
    RandomFourierFeatures,
    mean_field_logits,
)


def _largest_singular_value(layer: BoundedSpectralConv) -> float:
    w = layer.weight().detach().reshape(layer.weight().shape[0], -1).double()
    return float(torch.linalg.svdvals(w)[0])


def test_spectral_norm_stays_below_the_bound_after_training_steps():
    torch.manual_seed(0)
    head = PusegnetHead(12, 3, hidden_dim=16, n_layers=2, dropout=0.0, spec_norm_bound=0.95, projection_dim=8,
                        n_random_features=32)
    layers = [head.stack.input, *head.stack.blocks]
    for layer in layers:  # start far above the bound, so the bound has to act
        layer.conv.parametrizations.weight.original.data.mul_(20.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    x, y = torch.randn(4, 12, 5, 5), torch.randint(3, (4, 5, 5))
    for _ in range(30):
        loss = F.cross_entropy(head(x)["logits"], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    head.converge_spectral_norm()  # what the trainer does once before the export
    for layer in layers:
        raw = float(torch.linalg.svdvals(layer.conv.parametrizations.weight.original.detach().flatten(1))[0])
        assert raw > 2.0  # the unconstrained weight is far above the bound ...
        assert _largest_singular_value(layer) <= 0.95 * (1 + 1e-4)  # ... the effective one is not


def test_spectral_norm_leaves_a_small_layer_unchanged():
    layer = BoundedSpectralConv(6, 4, bound=0.95)
    with torch.no_grad():
        layer.conv.parametrizations.weight.original.mul_(1e-3)
    for _ in range(20):  # converge the power iteration
        layer.train()(torch.randn(1, 6, 2, 2))
    layer.eval()
    original = layer.conv.parametrizations.weight.original.detach()
    torch.testing.assert_close(layer.weight().detach(), original, rtol=1e-4, atol=1e-7)  # min(1, c / sigma) = 1


def test_random_features_approximate_the_rbf_kernel():
    generator = torch.Generator().manual_seed(0)
    lengthscale = 1.5
    rff = RandomFourierFeatures(4, 8192, lengthscale, generator)
    u = torch.randn(30, 4, generator=generator) * 0.8
    phi = rff(u[:, :, None, None])[:, :, 0, 0].double()  # (30, R)
    approx = phi @ phi.T
    exact = torch.exp(-torch.cdist(u.double(), u.double()) ** 2 / (2 * lengthscale**2))
    # Monte Carlo error of an R-feature estimate is O(1/sqrt(R)) ~ 0.011; 0.05 is ~4.5 standard deviations.
    assert float((approx - exact).abs().max()) < 0.05
    assert float((approx - exact).abs().mean()) < 0.012


def test_precision_update_matches_the_direct_formula():
    generator = torch.Generator().manual_seed(1)
    phi = torch.randn(20, 5, generator=generator)
    p = torch.rand(20, generator=generator)
    exact = LaplacePrecision(5, ridge=0.5, mode="last_epoch", momentum=0.9)
    exact.update(exact.batch_term(phi[:12], p[:12] * (1 - p[:12])), 12)
    exact.update(exact.batch_term(phi[12:], p[12:] * (1 - p[12:])), 8)
    direct = 0.5 * torch.eye(5, dtype=torch.float64)
    for i in range(20):
        direct += float(p[i] * (1 - p[i])) * torch.outer(phi[i].double(), phi[i].double())
    torch.testing.assert_close(exact.precision, direct)
    exact.finalize()
    torch.testing.assert_close(exact.covariance.double(), torch.linalg.inv(direct), rtol=1e-5, atol=1e-6)

    momentum = LaplacePrecision(5, ridge=0.5, mode="momentum", momentum=0.9)
    momentum.update(momentum.batch_term(phi[:12], torch.ones(12)), 12)
    expected = 0.9 * 0.5 * torch.eye(5, dtype=torch.float64) + 0.1 * (phi[:12].double().T @ phi[:12].double()) / 12
    torch.testing.assert_close(momentum.precision, expected)


def test_singular_precision_is_a_clear_error():
    laplace = LaplacePrecision(3, ridge=1.0, mode="last_epoch", momentum=0.9)
    laplace.precision.copy_(torch.diag(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="not positive definite.*smallest eigenvalue -1"):
        laplace.finalize()
    laplace.precision.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        laplace.finalize()


def test_mean_field_logits_formula():
    logits = torch.randn(2, 3, 4, 5)
    variance = torch.rand(2, 4, 5) * 3
    out = mean_field_logits(logits, variance, math.pi / 8)
    for b, k, i, j in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3)]:
        expected = float(logits[b, k, i, j]) / math.sqrt(1 + math.pi / 8 * float(variance[b, i, j]))
        assert abs(float(out[b, k, i, j]) - expected) < 1e-6


def test_variance_is_larger_far_from_the_training_data():
    """Two 2-D blobs as training data: the predictive variance is low on them and high far away."""
    torch.manual_seed(0)
    head = PusegnetHead(2, 2, hidden_dim=32, n_layers=2, dropout=0.0, projection_dim=16, n_random_features=512,
                        lengthscale=1.0)
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    labels = torch.randint(2, (400,), generator=gen)
    points = centres[labels] + 0.3 * torch.randn(400, 2, generator=gen)
    x = points.T[None, :, :, None]  # (1, 2, 400, 1): pixels as points
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(head(x)["logits"], labels[None, :, None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        out = head(x)
        phi = out["phi"][0, :, :, 0].T
        # the Gaussian-likelihood weight (1): with p (1 - p) the 400 near-certain points would add almost nothing
        head.laplace.update(head.laplace.batch_term(phi, torch.ones(len(phi))), len(phi))
        head.laplace.finalize()
        on_data = head.laplace.variance(out["phi"]).flatten()
        far = torch.tensor([[0.0, 6.0], [0.0, -6.0], [8.0, 8.0], [-8.0, 5.0]]).T[None, :, :, None]
        off_data = head.laplace.variance(head(far)["phi"]).flatten()
    assert float(off_data.min()) > 5 * float(on_data.median())


def _eval_head(sngp: bool) -> PusegnetEvalHead:
    torch.manual_seed(0)
    head = PusegnetHead(6, 4, hidden_dim=8, n_layers=1, projection_dim=4, n_random_features=16, sngp=sngp).eval()
    return PusegnetEvalHead(head, None, mean_field_factor=math.pi / 8, smooth_iterations=2, smooth_percentile=70,
                            smooth_window=3, smooth_sigma=0.5, smooth_eps=1e-3).eval()


@pytest.mark.parametrize("sngp", [True, False])
def test_eval_head_exports_with_dynamic_height_and_width(sngp):
    head = _eval_head(sngp)
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)}
    with torch.no_grad():
        program = torch.export.export(head, (torch.randn(2, 6, 5, 7),), dynamic_shapes={"features": dims},
                                      strict=False).module()
        other = torch.randn(3, 6, 9, 4)
        ours, theirs = head(other), program(other)
    assert set(ours) == {"code", "cluster_logits", "variance", "smoothed_logits"}
    assert ours["variance"].shape == (3, 9, 4)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key])
