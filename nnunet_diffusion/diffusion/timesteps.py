"""Timestep sampling for training and the sinusoidal timestep embedding."""
from __future__ import annotations

import math
from typing import Optional

import torch


def sample_timesteps(batch_size: int, num_steps: int, device: torch.device,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B,) long, uniform over 0..num_steps-1 (Ho et al. 2020, 'uniform timesteps')."""
    return torch.randint(0, num_steps, (batch_size,), generator=generator).to(device)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (B,) timesteps -> (B, dim), [cos | sin] halves.

    Frequencies are max_period^(-i / (dim/2)), i = 0..dim/2-1 (diffusers' get_timestep_embedding with
    flip_sin_to_cos=True, downscale_freq_shift=0). An odd ``dim`` is zero-padded by one column.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
