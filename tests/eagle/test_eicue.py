"""EiCue against independent references: float64 NumPy Laplacians and eigenvectors, brute-force affinities, a
hand-made sign-rule block, and images whose two regions the eigenvectors must separate."""

import numpy as np
import pytest
import torch

from eagle.eicue import (
    colour_affinity,
    eigenvectors,
    grid_colours,
    normalized_laplacian,
    sign_rule,
    smallest_eigenvectors,
)
from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SOLVERS = ("dense", "subset", "arpack")


def _reference_laplacian(w: np.ndarray) -> np.ndarray:
    d = w.sum(1)
    d[d < 1e-12] = 1.0
    inv = np.diag(1.0 / np.sqrt(d))
    return inv @ (np.diag(d) - w) @ inv


def _projector(v: np.ndarray) -> np.ndarray:
    q = np.linalg.qr(v.astype(np.float64))[0]
    return q @ q.T


def _random_affinity(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.random((n, n))
    return (a + a.T) / 2


def test_normalized_laplacian_matches_the_formula():
    w = np.stack([_random_affinity(12, s) for s in range(2)])
    ours = normalized_laplacian(torch.from_numpy(w)).numpy()
    for b in range(2):
        np.testing.assert_allclose(ours[b], _reference_laplacian(w[b]), rtol=1e-12, atol=1e-12)


def test_isolated_token_gets_degree_one_not_a_division_by_zero():
    w = _random_affinity(8, 3)
    w[5, :] = w[:, 5] = 0.0  # token 5 is isolated: zero degree
    ours = normalized_laplacian(torch.from_numpy(w[None])).numpy()[0]
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, _reference_laplacian(w), atol=1e-12)
    assert ours[5, 5] == 1.0 and np.abs(np.delete(ours[5], 5)).max() == 0.0


@pytest.mark.parametrize("solver", SOLVERS)
def test_smallest_eigenvectors_span_numpy_eigh_subspace(solver):
    k, n = 4, 40
    laps = np.stack([_reference_laplacian(_random_affinity(n, s)) for s in range(3)])
    ours = smallest_eigenvectors(torch.from_numpy(laps), k, solver).numpy()
    assert ours.shape == (3, n, k)
    atol = 1e-5 if solver == "arpack" else 1e-9  # ARPACK stops at a relative accuracy of 1e-6 (ARPACK_TOL)
    for b in range(3):
        values, vectors = np.linalg.eigh(laps[b])
        np.testing.assert_allclose(_projector(ours[b]), _projector(vectors[:, :k]), atol=atol)
        for j in range(k):  # each column is the eigenvector of the j-th smallest eigenvalue, not just the span
            np.testing.assert_allclose(laps[b] @ ours[b][:, j], values[j] * ours[b][:, j], atol=atol)


def test_sign_rule_on_a_hand_made_block():
    three_quarters = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # 3 of 4 positive: negated
    all_positive = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # fraction 1: kept
    half = torch.tensor([[1.0, -2.0], [3.0, -4.0]])  # exactly 0.5: kept
    quarter = torch.tensor([[1.0, -2.0], [-3.0, -4.0]])  # 1 of 4: kept
    out = sign_rule(torch.stack([three_quarters, all_positive, half, quarter]))
    torch.testing.assert_close(out[0], -three_quarters)
    torch.testing.assert_close(out[1:], torch.stack([all_positive, half, quarter]))


def test_colour_affinity_matches_brute_force():
    rng = np.random.default_rng(0)
    colours = rng.normal(size=(1, 6, 3)) * 0.1
    ours = colour_affinity(torch.from_numpy(colours), sigma=0.1).numpy()[0]
    ref = np.array([[np.exp(-np.sum((a - b) ** 2) / (2 * 0.1**2)) for b in colours[0]] for a in colours[0]])
    np.testing.assert_allclose(ours, ref / ref.max(), rtol=1e-10)


def test_grid_colours_original_and_rgb_paths():
    image = torch.randn(1, 3, 8, 8)
    small = torch.nn.functional.interpolate(image, size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(grid_colours(image, (2, 2), "original"), small.flatten(2).transpose(1, 2) / 255.0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(grid_colours(image, (2, 2), "rgb"), (small * std + mean).flatten(2).transpose(1, 2))


def _two_region_image(grid: int, patch: int) -> torch.Tensor:
    """Left half red, right half blue, ImageNet-normalised: (1, 3, grid·patch, grid·patch)."""
    rgb = torch.zeros(3, grid * patch, grid * patch)
    half = grid * patch // 2
    rgb[0, :, :half] = 0.9
    rgb[2, :, half:] = 0.9
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((rgb - mean) / std)[None]


@pytest.mark.parametrize("solver", SOLVERS)
def test_eicue_separates_two_colour_regions(solver):
    grid = 8
    image = _two_region_image(grid, 4)
    noise = torch.randn(1, grid * grid, 5, generator=torch.Generator().manual_seed(0))
    code = torch.ones(1, grid * grid, 5) + 0.01 * noise
    vectors = eigenvectors(image, code, k=4, colour="rgb", solver=solver)  # code uninformative: colour decides
    fiedler = vectors[0, :, 1].reshape(grid, grid)
    left, right = fiedler[:, : grid // 2], fiedler[:, grid // 2:]
    assert (torch.sign(left) == torch.sign(left[0, 0])).all() and (torch.sign(right) == -torch.sign(left[0, 0])).all()


def test_eicue_separates_two_code_regions_on_a_constant_image():
    grid = 8
    region = torch.zeros(grid, grid, dtype=torch.long)
    region[: grid // 2] = 1  # top / bottom halves
    embed = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.2]])
    code = embed[region.flatten()][None]  # (1, N, 3)
    image = torch.zeros(1, 3, 32, 32)  # constant image: the colour affinity is all ones
    vectors = eigenvectors(image, code, k=4)  # the original colour path
    assert torch.isfinite(vectors).all()
    fiedler = vectors[0, :, 1]
    top, bottom = fiedler[region.flatten() == 1], fiedler[region.flatten() == 0]
    assert (torch.sign(top) == torch.sign(top[0])).all() and (torch.sign(bottom) == -torch.sign(top[0])).all()


def test_eigenvectors_match_a_float64_reference_pipeline():
    gen = torch.Generator().manual_seed(1)
    image, code = torch.randn(2, 3, 24, 24, generator=gen), torch.randn(2, 9, 6, generator=gen)
    ours = eigenvectors(image, code, k=3, colour="rgb").numpy()
    colours = grid_colours(image.double(), (3, 3), "rgb").numpy()
    for b in range(2):
        z = code[b].double().numpy()
        w_code = np.maximum(z @ z.T, 0)
        w_col = np.array([[np.exp(-np.sum((p - q) ** 2) / 0.02) for q in colours[b]] for p in colours[b]])
        lap = _reference_laplacian(w_code / w_code.max() + w_col / w_col.max())
        np.testing.assert_allclose(_projector(ours[b]), _projector(np.linalg.eigh(lap)[1][:, :3]), atol=1e-5)
        positive = (ours[b] > 0).mean()
        assert not 0.5 < positive < 1.0  # the sign rule was applied


def test_bad_inputs():
    image = torch.zeros(1, 3, 16, 16)
    code = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="NaN"):
        eigenvectors(image, code.clone().fill_(float("nan")), k=4)
    with pytest.raises(ValueError, match="patch grid"):
        eigenvectors(image, torch.randn(1, 15, 4), k=4)
    # All-zero code (relu(ZZᵀ) has max 0) on a constant image: finite, not 0/0.
    assert torch.isfinite(eigenvectors(image, torch.zeros(1, 16, 4), k=4)).all()
    assert torch.isfinite(eigenvectors(image, -torch.ones(1, 16, 4), k=4)).all()
