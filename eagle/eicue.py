"""EiCue: spectral cues from the head's code and the image colours (training-time only, never exported).

Per image, on the patch grid (N = h·w tokens):

    W_code = relu(Z Zᵀ) / max          (Z: the head's code, N × D)
    W_col  = exp(-‖c_i − c_j‖² / (2σ²)) / max   (c: the image bilinearly resized to the grid)
    W = W_code + W_col,   d = W·1 (d < 1e-12 → 1),   L_sym = D^{-1/2} (D − W) D^{-1/2}

and the K eigenvectors of L_sym of smallest eigenvalue, with the original's sign rule applied to the N × K block.

Colour: ``colour="original"`` (default, for parity) takes the ImageNet-normalised tensor divided by 255 as the
colour, as the released code does; its distances are then tiny and W_col is close to a constant matrix.
``colour="rgb"`` takes the un-normalised RGB in [0, 1], which is what σ = 0.1 was presumably meant for.

Solvers (``solver=``), all giving the same subspace (benchmarks/eagle.py measures time and agreement):
"dense" is the batched ``torch.linalg.eigh`` of every full matrix (any device); "subset" asks LAPACK's MRRR
driver (SciPy ``eigh(subset_by_index=...)``) for the K wanted pairs only, skipping the back-transformation of
the other N − K vectors (CPU); "arpack" runs implicitly restarted Lanczos (SciPy ``eigsh``) for the K largest
eigenpairs of 2I − L_sym (the same vectors; L_sym's spectrum lies in [0, 2]) from a fixed start vector, so it
is deterministic, and needs only matrix-vector products (CPU; a matrix on which it does not converge falls back
to "subset"). "auto" is "arpack" on the CPU and "dense" on other devices.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD

Colour = Literal["original", "rgb"]
Solver = Literal["auto", "dense", "subset", "arpack"]
ARPACK_TOL = 1e-6  # relative accuracy of the Ritz values; the subspaces then agree with float64 eigh to ~1e-9
DEGREE_FLOOR = 1e-12  # the original's threshold: a token with a smaller degree gets degree 1
_TINY = 1e-12  # a max below this means an all-zero affinity: divide by 1 instead (the matrix stays zero)


def _divide_by_max(w: torch.Tensor) -> torch.Tensor:
    """w (B, N, N) divided by each matrix's max; an all-zero matrix (max 0) stays zero instead of 0/0 = NaN."""
    peak = w.amax(dim=(1, 2), keepdim=True)
    return w / torch.where(peak > _TINY, peak, torch.ones_like(peak))


def code_affinity(code: torch.Tensor) -> torch.Tensor:
    """relu(Z Zᵀ) divided by its max: code (B, N, D) -> (B, N, N)."""
    return _divide_by_max(torch.relu(code @ code.transpose(1, 2)))


def grid_colours(image: torch.Tensor, grid: tuple[int, int], colour: Colour = "original") -> torch.Tensor:
    """The colour of every token: image (B, 3, H, W) ImageNet-normalised -> (B, N, 3), N = grid[0]·grid[1].

    Bilinear resize to the grid (align_corners=False, as the original). "original": the normalised values / 255;
    "rgb": un-normalised to RGB in [0, 1].
    """
    small = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)  # (B, 3, h, w)
    if colour == "original":
        small = small / 255.0
    elif colour == "rgb":
        mean = torch.tensor(IMAGENET_MEAN, dtype=small.dtype, device=small.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=small.dtype, device=small.device).view(1, 3, 1, 1)
        small = small * std + mean
    else:
        raise ValueError(f"colour={colour!r} is unknown; use 'original' (the released code's) or 'rgb'.")
    return small.flatten(2).transpose(1, 2)


def colour_affinity(colours: torch.Tensor, sigma: float = 0.1) -> torch.Tensor:
    """exp(-‖c_i − c_j‖² / (2σ²)) divided by its max: colours (B, N, 3) -> (B, N, N)."""
    sq = torch.cdist(colours, colours, p=2.0).square()
    return _divide_by_max(torch.exp(-sq / (2 * sigma**2)))


def normalized_laplacian(w: torch.Tensor) -> torch.Tensor:
    """L_sym = D^{-1/2} (D − W) D^{-1/2} of affinities w (B, N, N), degrees below 1e-12 set to 1 (an isolated
    token then has L_ii = 1 and no coupling, instead of a division by zero)."""
    degree = w.sum(dim=2)
    degree = torch.where(degree < DEGREE_FLOOR, torch.ones_like(degree), degree)
    inv_sqrt = degree.rsqrt()  # (B, N)
    lap = torch.diag_embed(degree) - w
    return inv_sqrt.unsqueeze(2) * lap * inv_sqrt.unsqueeze(1)


def sign_rule(vectors: torch.Tensor) -> torch.Tensor:
    """The original's sign rule: negate an image's whole (N, K) block when the fraction of its positive entries
    lies strictly between 0.5 and 1. vectors (B, N, K) -> (B, N, K)."""
    positive = (vectors > 0).to(vectors.dtype).mean(dim=(1, 2))  # (B,)
    flip = (positive > 0.5) & (positive < 1.0)
    return torch.where(flip.view(-1, 1, 1), -vectors, vectors)


def smallest_eigenvectors(lap: torch.Tensor, k: int, solver: Solver = "auto") -> torch.Tensor:
    """The k eigenvectors of smallest eigenvalue (ascending) of symmetric lap (B, N, N) -> (B, N, k), no sign rule."""
    n = lap.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"eigen_k={k} must lie in 1..{n} (the number of tokens of the patch grid).")
    if solver == "auto":
        solver = "arpack" if lap.device.type == "cpu" else "dense"
    if solver == "dense":
        return torch.linalg.eigh(lap)[1][..., :k]
    if solver not in ("subset", "arpack"):
        raise ValueError(f"eigen_solver={solver!r} is unknown; use 'auto', 'dense', 'subset' or 'arpack'.")
    matrices = lap.detach().cpu().numpy()
    out = np.empty((*matrices.shape[:2], k), dtype=matrices.dtype)
    # ARPACK is a few dozen matrix-vector products of N x N: too small for BLAS threads, whose wake-up at every
    # product costs more than the product (8 Laplacians of 784 x 784: 12 ms with one BLAS thread, 113 ms with 2).
    # LAPACK's subset drivers do use the threads, so only the ARPACK path is limited.
    blas_threads = 1 if solver == "arpack" else None
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for b, matrix in enumerate(matrices):
            out[b] = _arpack(matrix, k) if solver == "arpack" and k < n - 1 else _subset(matrix, k)
    return torch.from_numpy(out).to(lap.device)


def _subset(matrix: np.ndarray, k: int) -> np.ndarray:
    """MRRR for the k smallest pairs of one (N, N) matrix -> (N, k); finiteness is checked by the caller."""
    return scipy.linalg.eigh(matrix, subset_by_index=[0, k - 1], driver="evr", check_finite=False)[1]


def _arpack(matrix: np.ndarray, k: int) -> np.ndarray:
    """Lanczos on 2I − L for the k largest pairs of one (N, N) matrix -> (N, k) in ascending order of L's
    eigenvalues; falls back to `_subset` when ARPACK does not converge."""
    shifted = -matrix
    shifted[np.diag_indices_from(shifted)] += 2.0
    start = np.ones(matrix.shape[0], dtype=matrix.dtype)  # fixed: the same vectors on every run
    try:
        values, vectors = scipy.sparse.linalg.eigsh(shifted, k=k, which="LA", v0=start, tol=ARPACK_TOL)
    except scipy.sparse.linalg.ArpackNoConvergence:
        return _subset(matrix, k)
    return vectors[:, np.argsort(-values)]


def eigenvectors(image: torch.Tensor, code: torch.Tensor, k: int = 4, *, colour: Colour = "original",
                 sigma: float = 0.1, solver: Solver = "auto") -> torch.Tensor:
    """EiCue eigenvectors: image (B, 3, H, W) ImageNet-normalised, code (B, N, D) with N the patch-grid size
    -> (B, N, k), the eigenvectors of smallest eigenvalue of L_sym after the sign rule, trivial first one included.

    The grid is taken square (N = s², as the original's 28×28), or the image's aspect when N fits it.
    No gradient flows (the original detaches the Laplacian). Raises ValueError on NaN/Inf inputs.
    """
    if image.ndim != 4 or image.shape[1] != 3 or code.ndim != 3 or code.shape[0] != image.shape[0]:
        raise ValueError(f"eigenvectors expects image (B, 3, H, W) and code (B, N, D) with the same B, got "
                         f"{tuple(image.shape)} and {tuple(code.shape)}.")
    with torch.no_grad():
        if not bool(torch.isfinite(code).all()):
            raise ValueError("EiCue: the head's code holds NaN or Inf values; the head has diverged, so lower the "
                             "learning rate and resume from the last good checkpoint.")
        if not bool(torch.isfinite(image).all()):
            raise ValueError("EiCue: the image batch holds NaN or Inf values; check the dataset files.")
        grid = patch_grid(image.shape[-2:], code.shape[1])
        w = code_affinity(code.float()) + colour_affinity(grid_colours(image.float(), grid, colour), sigma)
        vectors = smallest_eigenvectors(normalized_laplacian(w), k, solver)
        return sign_rule(vectors)


def patch_grid(size: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """(h, w) of the token grid of an image of `size` (H, W) holding n_tokens tokens in row-major order."""
    height, width = int(size[0]), int(size[1])
    for h in range(1, n_tokens + 1):
        if n_tokens % h == 0 and h * width == (n_tokens // h) * height:
            return h, n_tokens // h
    raise ValueError(f"code has {n_tokens} tokens, which is no patch grid of an image of {height}x{width}; pass "
                     "the code of that image, (B, h*w, D) in row-major order.")
