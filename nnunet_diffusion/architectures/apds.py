"""APDS (Cross-Timestep sec. 3.1, Appendix B): a prior decoder on the image branch and time-weighted fusion."""
from __future__ import annotations

from typing import List, Type

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn


def apds_prior_weight(t: torch.Tensor, num_timesteps: int, alpha: float) -> torch.Tensor:
    """w_t = alpha * exp(-5 (1 - t/T)) * (1 - exp(-10 t/T))  (eq. 23). t: (B,) -> (B,) float."""
    u = t.float() / num_timesteps
    return alpha * torch.exp(-5.0 * (1 - u)) * (1 - torch.exp(-10.0 * u))


class PriorDecoder(nn.Module):
    """Decodes a segmentation from the image encoder's features alone ('APDS Out').

    Mirrors the main decoder's layout (a dynamic_network_architectures UNetDecoder built on the image encoder)
    and also returns the feature map of every decoder stage, which the main decoder fuses with its own.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, skips: List[torch.Tensor]):
        """skips: image-encoder features, bottleneck last -> (logits (B, C, *S), [stage features])."""
        features, x = [], skips[-1]
        for s, stage in enumerate(self.decoder.stages):
            x = stage(torch.cat((self.decoder.transpconvs[s](x), skips[-(s + 2)]), 1))
            features.append(x)
        return self.decoder.seg_layers[-1](x), features


class PriorFusion(nn.Module):
    """F_fused = (1 - w_t) * RA(F, F_prior) + w_t * F_prior (eq. 2). RA: one conv block on [F | F_prior]."""

    def __init__(self, channels: int, conv_op: Type[nn.Module], norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        self.refine = StackedConvBlocks(1, conv_op, 2 * channels, channels, 3, 1, True, norm_op, norm_op_kwargs,
                                        None, None, nonlin, nonlin_kwargs)

    def forward(self, x: torch.Tensor, prior: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - w) * self.refine(torch.cat([x, prior], dim=1)) + w * prior

