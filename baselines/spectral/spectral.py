"""Per-image spectral segmentation of patch features, in plain torch so that it runs inside an exported program.

For one image with n = h*w patch tokens (features f_i, L2-normalised):

    A_ij = relu(<f_i, f_j>) * G_ij  (+ an optional extra affinity, e.g. colour, at fit time only)
    G_ij = exp(-|p_i - p_j|^2 / 2 sigma^2)          (spatial window over token positions p; sigma = 0: G = 1)
    L    = I - D^-1/2 A D^-1/2                      (normalised Laplacian, D = diag(row sums of A))
    u_i  = D^-1/2 [v_0 .. v_{m-1}]_i                (the first m eigenvectors of L, as generalised eigenvectors)

then a fixed-size k-means (S segments, farthest-point initialisation, a fixed number of Lloyd iterations) on
the rows u_i gives the per-image segments. Every loop runs a constant number of times (m, S and the iteration
count are Python integers), there is no `.item()` and no branch on tensor values, so `torch.export` traces it
with dynamic batch, height and width.

Why these choices: k-means distances do not change when an eigenvector flips sign (eigh's sign is arbitrary),
nor under a rotation inside a degenerate eigenspace that is kept whole. The trivial eigenvector is kept: on a
connected graph its generalised form is constant and adds nothing to the distances, on a disconnected graph it
is one of the component indicators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEGREE_EPS = 1e-8  # an all-zero feature vector has degree 0; its row of D^-1/2 stays finite


def token_positions(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Row-major (row, column) of the h*w tokens, divided by the longer side: (n, 2) in [0, 1)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                            indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=1) / torch.sym_max(h, w)


def spatial_window(h: int, w: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """exp(-|p_i - p_j|^2 / 2 sigma^2) of token positions in units of the longer side: (n, n).

    Pairwise distances are written out rather than computed with `torch.cdist` (see `squared_distances`).
    """
    p = token_positions(h, w, device, dtype)
    return torch.exp(-(p[:, None, :] - p[None, :, :]).square().sum(-1) / (2 * sigma ** 2))


def patch_affinity(features: torch.Tensor, spatial_sigma: float = 0.0) -> torch.Tensor:
    """relu of the cosine similarity of every pair of tokens: features (B, C, h, w) -> (B, n, n), n = h*w.

    spatial_sigma > 0 multiplies it by a Gaussian window over token distance (sigma in units of the image's
    longer side), so that far-apart tokens barely link: the segments become spatially coherent regions instead
    of noisy scatterings (the feature-only stand-in for the original's colour-and-position affinity).
    """
    _, _, h, w = features.shape
    x = F.normalize(features.float(), dim=1).flatten(2)  # (B, C, n)
    affinity = torch.relu(torch.bmm(x.transpose(1, 2), x))
    if spatial_sigma > 0:
        affinity = affinity * spatial_window(h, w, spatial_sigma, x.device, x.dtype)[None]
    return affinity


def colour_affinity(colours: torch.Tensor, sigma_colour: float, sigma_space: float) -> torch.Tensor:
    """Gaussian affinity of nearby tokens of similar colour: colours (B, 3, h, w) in [0, 1] -> (B, n, n).

    exp(-|c_i - c_j|^2 / 2 sigma_colour^2) * G_ij with the spatial window G of `spatial_window` (sigma_space in
    units of the longer side). Fit time only: the exported program sees features, not pixels.
    """
    _, _, h, w = colours.shape
    c = colours.float().flatten(2).transpose(1, 2)  # (B, n, 3)
    colour = torch.exp(-(c[:, :, None, :] - c[:, None, :, :]).square().sum(-1) / (2 * sigma_colour ** 2))
    return colour * spatial_window(h, w, sigma_space, c.device, c.dtype)[None]


def laplacian_embedding(affinity: torch.Tensor, n_eigenvectors: int) -> torch.Tensor:
    """Rows of the first m generalised eigenvectors of the normalised Laplacian: (B, n, n) -> (B, n, m).

    eigh returns eigenvalues in ascending order, so the first columns are the smoothest. An image with fewer
    than m tokens gets zero columns for the missing ones (they do not change any distance).
    """
    n = affinity.shape[-1]
    inv_sqrt_degree = affinity.sum(-1).clamp_min(DEGREE_EPS).rsqrt()  # (B, n)
    eye = torch.eye(n, dtype=affinity.dtype, device=affinity.device)
    laplacian = eye - inv_sqrt_degree[:, :, None] * affinity * inv_sqrt_degree[:, None, :]
    _, vectors = torch.linalg.eigh(laplacian)  # (B, n, n), columns = eigenvectors
    first = torch.eye(n, n_eigenvectors, dtype=affinity.dtype, device=affinity.device)  # selects columns 0..m-1
    return torch.matmul(vectors * inv_sqrt_degree[:, :, None], first)


def squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """points (B, n, m), centres (B, S, m) -> (B, n, S).

    Written out rather than `torch.cdist`, which switches algorithm on the input size and so would pin an
    exported program to one side of that threshold.
    """
    return (points[:, :, None, :] - centres[:, None, :, :]).square().sum(-1)


def _pick(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """points (B, n, m), index (B,) -> (B, 1, m)."""
    return torch.gather(points, 1, index[:, None, None].expand(-1, 1, points.shape[-1]))


def farthest_point_centres(points: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Deterministic k-means initialisation: points (B, n, m) -> centres (B, S, m).

    The first centre is the point farthest from the mean; each next one the point farthest from those chosen.
    """
    far = (points - points.mean(1, keepdim=True)).square().sum(-1)  # (B, n)
    centres = [_pick(points, far.argmax(1))]
    nearest = (points - centres[0]).square().sum(-1)
    for _ in range(1, n_segments):
        centres.append(_pick(points, nearest.argmax(1)))
        nearest = torch.minimum(nearest, (points - centres[-1]).square().sum(-1))
    return torch.cat(centres, dim=1)


def kmeans_segments(points: torch.Tensor, n_segments: int, n_iter: int) -> torch.Tensor:
    """Fixed-iteration Lloyd k-means of each image's points (B, n, m) -> segment id per point (B, n) int64.

    A centre that loses all its points keeps its position (the segment is then empty, which downstream code
    tolerates: no token reads an empty segment's descriptor).
    """
    centres = farthest_point_centres(points, n_segments)
    for _ in range(n_iter):
        one_hot = F.one_hot(squared_distances(points, centres).argmin(-1), n_segments).to(points.dtype)
        counts = one_hot.sum(1)  # (B, S)
        sums = torch.bmm(one_hot.transpose(1, 2), points)  # (B, S, m)
        centres = torch.where(counts[:, :, None] > 0, sums / counts.clamp_min(1)[:, :, None], centres)
    return squared_distances(points, centres).argmin(-1)


def spectral_segments(features: torch.Tensor, *, n_eigenvectors: int, n_segments: int, n_iter: int,
                      spatial_sigma: float = 0.0, extra_affinity: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image segments of features (B, C, h, w) -> (B, n) int64 ids in [0, S); n = h*w, row-major.

    extra_affinity (B, n, n), e.g. `colour_weight * colour_affinity(...)`, is added to the feature affinity.
    """
    affinity = patch_affinity(features, spatial_sigma)
    if extra_affinity is not None:
        affinity = affinity + extra_affinity
    return kmeans_segments(laplacian_embedding(affinity, n_eigenvectors), n_segments, n_iter)


def segment_means(features: torch.Tensor, segments: torch.Tensor, n_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean L2-normalised feature of each segment: features (B, C, h, w), segments (B, n) ->
    (descriptors (B, S, C), L2-normalised, zero for an empty segment; token counts (B, S))."""
    x = F.normalize(features.float(), dim=1).flatten(2).transpose(1, 2)  # (B, n, C)
    one_hot = F.one_hot(segments, n_segments).to(x.dtype)  # (B, n, S)
    counts = one_hot.sum(1)
    means = torch.bmm(one_hot.transpose(1, 2), x) / counts.clamp_min(1)[:, :, None]
    return F.normalize(means, dim=-1), counts
