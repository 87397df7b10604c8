"""Gaussian KL and discretized-Gaussian decoder likelihood used by the variational bound (IDDPM / ADM).

All functions work element-wise (with broadcasting) and return natural-log values (nats); the diffusion code
divides by ln 2 to report bits.
"""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: torch.Tensor | float, logvar1: torch.Tensor | float,
              mean2: torch.Tensor | float, logvar2: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) element-wise, in nats.

    Scalars are allowed for any argument but at least one must be a tensor (it sets device and dtype).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one torch.Tensor argument")
    logvar1, logvar2 = (torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (|error| < 2e-4), the one ADM's decoder NLL uses.

    Kept instead of the exact erf so that the t=0 loss term matches the published (IDDPM/ADM/DiT) values.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                       log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) under N(means, exp(log_scales)^2) discretized into 256 bins of width 2/255 on [-1, 1].

    ``x`` is assumed to be 8-bit data rescaled to [-1, 1]; the two edge bins extend to -inf / +inf. In latent
    space this is only a convention inherited from ADM (DiT issue #52). Returns natural-log probabilities.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))                  # lowest bin: P(X <= x + 1/255)
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # highest bin: P(X >= x - 1/255)
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
