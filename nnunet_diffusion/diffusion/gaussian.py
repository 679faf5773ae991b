"""Closed-form Gaussian diffusion: q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), x0 <-> eps.

``t`` is always an index into a :class:`NoiseSchedule` (0..K-1), given as a (B,) long tensor; the per-sample
coefficients are broadcast over the remaining dimensions of ``x`` (B, C, *spatial).
"""
from __future__ import annotations

import torch

from nnunet_diffusion.diffusion.schedules import NoiseSchedule


def gather_coefficient(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pick values[t] (float64, CPU) and shape it (B, 1, ..., 1) to broadcast against ``like``."""
    picked = values[t.cpu()].to(device=like.device, dtype=like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.  x0, noise: (B, C, *S); t: (B,)."""
    abar = gather_coefficient(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    abar = gather_coefficient(schedule.alphas_cumprod, t, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    abar = gather_coefficient(schedule.alphas_cumprod, t, x_t)
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def posterior_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).

    mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    var  = beta_t (1 - abar_{t-1}) / (1 - abar_t)          (0 at t = 0)
    Returns (mean (B, C, *S), variance (B, 1, ..., 1)).
    """
    abar = gather_coefficient(schedule.alphas_cumprod, t, x_t)
    abar_prev = gather_coefficient(schedule.alphas_cumprod_prev, t, x_t)
    beta = gather_coefficient(schedule.betas, t, x_t)
    mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0 + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)) * x_t
    variance = beta * (1 - abar_prev) / (1 - abar)
    return mean, variance
