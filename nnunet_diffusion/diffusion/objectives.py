"""Training objectives, written against a model callable so they stay free of networks and nnU-Net."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from nnunet_diffusion.diffusion.gaussian import q_sample
from nnunet_diffusion.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MIN_SNR_GAMMA = 5.0  # Hang et al. 2023 (Min-SNR weighting): their recommended gamma


def min_snr_eps_weight(schedule: NoiseSchedule, t, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Weight of an eps-MSE at index t (an int, or a (B,) tensor of indices): min(SNR_t, gamma) / SNR_t, with
    SNR_t = abar_t / (1 - abar_t). The weighted eps error equals min(SNR_t, gamma) times the x0 error: 1 where the
    signal is weak, bounded where it is strong."""
    abar = schedule.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    return (torch.clamp(snr, max=gamma) / snr).float()


def recycled_noisy_mask(predict_x0: ModelFn, x0: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Recycling (Fu et al.): the x_t the second, gradient-carrying pass is trained on.

    The ground truth x0 (B, C, *S) is noised to the last step T-1, the model predicts a mask from it without
    gradient, and that prediction (not the ground truth) is noised to t (B,). The caller then trains
    model(x_t, t) against the ground truth. Training t should be drawn from 0..T-2.
    """
    last = torch.full_like(t, schedule.num_steps - 1)

    def randn_like(x):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

    with torch.no_grad():
        x0_first = predict_x0(q_sample(schedule, x0, last, randn_like(x0)), last).detach()
    return q_sample(schedule, x0_first, t, randn_like(x0))
