"""PU-SegNet modules (no I/O, no distributed calls): the SNGP head, its Laplace posterior and the eval head.

    features h (B, C, h, w)
      -> hidden = SNConv1x1(C->H)(h), then n_layers x [hidden + drop(ReLU(SNConv1x1(H->H)(hidden)))]   (B, H, h, w)
      -> u = LayerNorm(P hidden), P a fixed random (G x H) projection                                     (B, G, h, w)
      -> phi = sqrt(2/R) cos(W u / lengthscale + b), W ~ N(0, 1), b ~ U(0, 2 pi), both fixed               (B, R, h, w)
      -> logits = beta^T phi (no bias)                                                                     (B, K, h, w)
    variance v = phi^T Sigma phi with Sigma^-1 = tau I + sum_pixels w(p) phi phi^T   (Laplace, shared by classes)
    mean-field logits = logits / sqrt(1 + lambda v)                                  (lambda = pi / 8)

``sngp=False`` (the deterministic ablation) keeps the residual stack without spectral normalisation and replaces
the random features and the Gaussian-process output by a plain 1x1 output layer; its "variance" is then
1 - max softmax probability, so that the same smoothing and the same uncertainty metrics apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pusegnet.smoothing import uncertainty_aware_smoothing


class BoundedSpectralConv(nn.Module):
    """A 1x1 convolution whose weight matrix has spectral norm at most ``bound`` (SNGP's soft spectral norm).

    torch's ``spectral_norm`` parametrisation gives W / sigma (sigma by power iteration, one step per training
    forward); SNGP only shrinks a layer whose norm exceeds the bound: W_eff = W * min(1, c / sigma). Since the
    parametrised weight is W / sigma, sigma = <W, W/sigma> / |W/sigma|^2 exactly, and W_eff = (W / sigma) *
    min(sigma, c).
    """

    def __init__(self, in_dim: int, out_dim: int, bound: float, n_power_iterations: int = 1) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"spectral norm bound must be positive, got spec_norm_bound={bound}.")
        self.bound = float(bound)
        self.conv = spectral_norm(nn.Conv2d(in_dim, out_dim, kernel_size=1), n_power_iterations=n_power_iterations)

    def weight(self) -> torch.Tensor:
        """The effective weight (out, in, 1, 1)."""
        unit = self.conv.weight  # W / sigma
        original = self.conv.parametrizations.weight.original
        sigma = (original * unit).sum() / (unit * unit).sum()
        return unit * torch.clamp(sigma, max=self.bound)

    @torch.no_grad()
    def converge(self, max_iterations: int = 1000, tol: float = 1e-7) -> None:
        """Run the power iteration until sigma settles, so that the exported layer's norm is the bound (one
        iteration per training step can leave sigma a few percent low when the top singular values are close)."""
        parametrization = self.conv.parametrizations.weight[0]
        mode = parametrization.training
        parametrization.train()  # reading the weight in training mode performs one power-iteration step
        previous = float("inf")
        for _ in range(max_iterations):
            unit = self.conv.weight  # one power-iteration step
            sigma = float((self.conv.parametrizations.weight.original * unit).sum() / (unit * unit).sum())
            if abs(sigma - previous) <= tol * max(sigma, 1e-12):
                break
            previous = sigma
        parametrization.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.conv.bias)


def _conv(in_dim: int, out_dim: int, sngp: bool, bound: float) -> nn.Module:
    return BoundedSpectralConv(in_dim, out_dim, bound) if sngp else nn.Conv2d(in_dim, out_dim, kernel_size=1)


class ResidualStack(nn.Module):
    """Input 1x1 layer C -> H, then ``n_layers`` residual blocks ``x + drop(ReLU(conv(x)))``, all spectrally
    normalised when ``sngp`` (the residual form plus the norm bound keeps the map distance preserving)."""

    def __init__(self, in_dim: int, hidden_dim: int, n_layers: int, dropout: float, sngp: bool, bound: float) -> None:
        super().__init__()
        self.input = _conv(in_dim, hidden_dim, sngp, bound)
        self.blocks = nn.ModuleList([_conv(hidden_dim, hidden_dim, sngp, bound) for _ in range(n_layers)])
        self.dropout = nn.Dropout2d(p=dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w) -> hidden (B, H, h, w)."""
        x = self.input(self.dropout(features))
        for block in self.blocks:
            x = x + self.dropout(F.relu(block(x)))
        return x


class RandomFourierFeatures(nn.Module):
    """phi(u) = sqrt(2/R) cos(W u / lengthscale + b): phi(u)^T phi(u') -> exp(-|u - u'|^2 / (2 lengthscale^2)).

    W (R, G) ~ N(0, 1) and b (R,) ~ U(0, 2 pi) are fixed buffers drawn from ``generator``.
    """

    def __init__(self, in_dim: int, n_features: int, lengthscale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.scale = math.sqrt(2.0 / n_features)
        self.lengthscale = float(lengthscale)
        self.register_buffer("weight", torch.randn(n_features, in_dim, generator=generator))
        self.register_buffer("phase", 2 * math.pi * torch.rand(n_features, generator=generator))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, G, h, w) -> phi (B, R, h, w)."""
        proj = torch.einsum("bghw,rg->brhw", u, self.weight) / self.lengthscale
        return self.scale * torch.cos(proj + self.phase[None, :, None, None])


class LaplacePrecision(nn.Module):
    """The Laplace posterior of the output layer: precision tau I + sum w phi phi^T, and its inverse.

    ``mode="last_epoch"``: exact sum over the pixels seen since :meth:`reset`; ``"momentum"``: a moving average
    ``P <- m P + (1 - m) (batch sum / batch pixels)`` starting from tau I (SNGP's momentum variant). The
    covariance is computed once by :meth:`finalize` (Cholesky) and used by every later forward.
    """

    def __init__(self, n_features: int, ridge: float, mode: str, momentum: float) -> None:
        super().__init__()
        if mode not in ("last_epoch", "momentum"):
            raise ValueError(f"precision_mode must be 'last_epoch' or 'momentum', got {mode!r}.")
        self.ridge, self.mode, self.momentum = float(ridge), mode, float(momentum)
        self.register_buffer("precision", ridge * torch.eye(n_features, dtype=torch.float64))
        self.register_buffer("covariance", torch.eye(n_features) / ridge)

    def reset(self) -> None:
        self.precision.copy_(self.ridge * torch.eye(self.precision.shape[0], dtype=torch.float64))

    @torch.no_grad()
    def batch_term(self, phi: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """sum_i w_i phi_i phi_i^T (R, R) float64 for phi (P, R) and weights (P,)."""
        phi = phi.double()
        return (phi * weight.double()[:, None]).T @ phi

    @torch.no_grad()
    def update(self, term: torch.Tensor, n_pixels: int) -> None:
        """Add one batch's (already all-reduced) term; ``n_pixels`` is its pixel count (momentum mode)."""
        if self.mode == "last_epoch":
            self.precision += term
        else:
            self.precision.mul_(self.momentum).add_(term / max(n_pixels, 1), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def finalize(self) -> None:
        """Invert the precision once (Cholesky); a ValueError naming the smallest eigenvalue if it is not PD."""
        precision = self.precision
        if not torch.isfinite(precision).all():
            raise ValueError("the Laplace precision matrix holds NaN or infinite entries (non-finite random "
                             "features from non-finite features?); check the feature cache and retrain.")
        factor, info = torch.linalg.cholesky_ex(precision)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(precision).min())
            raise ValueError(f"the Laplace precision matrix is not positive definite (smallest eigenvalue "
                             f"{smallest:.3g}); use gp_ridge > 0 (now {self.ridge}) so that it is invertible.")
        self.covariance.copy_(torch.cholesky_inverse(factor).float())

    def variance(self, phi: torch.Tensor) -> torch.Tensor:
        """phi (B, R, h, w) -> phi^T Sigma phi (B, h, w)."""
        flat = phi.permute(0, 2, 3, 1)  # (B, h, w, R): one (pixels x R) @ (R x R) product
        return ((flat @ self.covariance) * flat).sum(dim=-1).clamp_min(0.0)


def mean_field_logits(logits: torch.Tensor, variance: torch.Tensor, factor: float) -> torch.Tensor:
    """logits (B, K, h, w) / sqrt(1 + factor * variance (B, h, w)): the mean-field approximation of the
    predictive softmax (factor pi/8 is the probit approximation)."""
    return logits / torch.sqrt(1.0 + factor * variance)[:, None]


class PusegnetHead(nn.Module):
    """The SNGP head (``sngp=True``) or its deterministic ablation (``sngp=False``).

    Args: in_dim C, n_clusters K (the base segmenter's clusters), hidden_dim H, n_layers, dropout,
    spec_norm_bound c, projection_dim G, n_random_features R, kernel lengthscale, ridge tau, precision mode and
    momentum, seed of the fixed random projection, random features and output init.
    """

    def __init__(self, in_dim: int, n_clusters: int, *, hidden_dim: int = 256, n_layers: int = 2,
                 dropout: float = 0.1, sngp: bool = True, spec_norm_bound: float = 0.95, projection_dim: int = 128,
                 n_random_features: int = 1024, lengthscale: float = 1.0, ridge: float = 1.0,
                 precision_mode: str = "last_epoch", momentum: float = 0.999, seed: int = 0) -> None:
        super().__init__()
        self.sngp, self.n_clusters, self.hidden_dim = sngp, n_clusters, hidden_dim
        self.stack = ResidualStack(in_dim, hidden_dim, n_layers, dropout, sngp, spec_norm_bound)
        if not sngp:
            self.output = nn.Conv2d(hidden_dim, n_clusters, kernel_size=1)
            return
        generator = torch.Generator().manual_seed(seed)
        # Fixed, like W and b: a random projection keeps distances (Johnson-Lindenstrauss) at a lower dimension.
        self.register_buffer("projection", torch.randn(projection_dim, hidden_dim, generator=generator)
                             / math.sqrt(hidden_dim))
        self.rff = RandomFourierFeatures(projection_dim, n_random_features, lengthscale, generator)
        self.output = nn.Conv2d(n_random_features, n_clusters, kernel_size=1, bias=False)
        self.laplace = LaplacePrecision(n_random_features, ridge, precision_mode, momentum)

    def converge_spectral_norm(self) -> None:
        """Converge every layer's power iteration (called once after training, before the export)."""
        for module in self.modules():
            if isinstance(module, BoundedSpectralConv):
                module.converge()

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features (B, C, h, w) -> {hidden (B, H, h, w), logits (B, K, h, w), phi (B, R, h, w) when sngp}."""
        hidden = self.stack(features)
        if not self.sngp:
            return {"hidden": hidden, "logits": self.output(hidden)}
        u = torch.einsum("bdhw,gd->bghw", hidden, self.projection)
        u = F.layer_norm(u.permute(0, 2, 3, 1), (u.shape[1],)).permute(0, 3, 1, 2)  # SNGP's GP-input norm
        phi = self.rff(u)
        return {"hidden": hidden, "logits": self.output(phi), "phi": phi}


class PusegnetEvalHead(nn.Module):
    """The exported head: features -> {code, cluster_logits, variance, smoothed_logits, linear_logits?}.

    code = the hidden features; cluster_logits = mean-field logits (the plain logits for the ablation);
    smoothed_logits = log of the uncertainty-aware smoothed probabilities. Shares the trained modules.
    """

    def __init__(self, head: PusegnetHead, linear_probe: nn.Module | None, *, mean_field_factor: float,
                 smooth_iterations: int, smooth_percentile: float, smooth_window: int, smooth_sigma: float,
                 smooth_eps: float) -> None:
        super().__init__()
        self.head, self.linear_probe = head, linear_probe
        self.mean_field_factor = float(mean_field_factor)
        self.smooth = {"iterations": int(smooth_iterations), "percentile": float(smooth_percentile),
                       "window": int(smooth_window), "sigma": float(smooth_sigma), "eps": float(smooth_eps)}

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(features)
        if self.head.sngp:
            variance = self.head.laplace.variance(out["phi"])  # (B, h, w)
            logits = mean_field_logits(out["logits"], variance, self.mean_field_factor)
        else:
            logits = out["logits"]
            variance = 1.0 - torch.softmax(logits, dim=1).amax(dim=1)
        probs = uncertainty_aware_smoothing(torch.softmax(logits, dim=1), variance, features, **self.smooth)
        result = {"code": out["hidden"], "cluster_logits": logits, "variance": variance,
                  "smoothed_logits": torch.log(probs.clamp_min(1e-12))}
        if self.linear_probe is not None:
            result["linear_logits"] = self.linear_probe(out["hidden"])
        return result
