"""Diffusion-guided feature refinement (DSM sec. 4.2.2, eqs. 16-18): one explicit step of a learned, guided
non-linear diffusion (Perona-Malik style) of a feature map, for 2d and 3d maps alike.

    E_i = F_i + sum_{j in N(i)} w_ij (F_j - F_i),   w_ij = softmax_j( <theta(G_i), phi(G_j)> / sqrt(c) )

F: the feature map (B, C, *S); G: the guidance, a deeper feature map upsampled to F's grid; N(i): the 3^d
neighbourhood (the voxel itself included, whose difference is zero); theta, phi: learned 1x1 projections (the
"matrix quantifying the similarity between semantic guidance feature maps with learnable weights"). Where the
guidance changes (a semantic boundary), w_ij concentrates on the neighbours of the same side, so the step smooths
along boundaries and not across them. The boundary-enhanced map is fused with F by a 1x1 conv.
Choices: one step (the paper does not give the number of steps), zero padding at the patch border (a border
neighbour contributes -F_i * w_ij, so its weight is masked to zero instead).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, C, 3^d, *S): each voxel's 3^d neighbourhood (zero outside the map), offsets in
    itertools.product order over (-1, 0, 1) per axis."""
    d = x.ndim - 2
    padded = F.pad(x, [1, 1] * d)
    shifted = []
    for offset in itertools.product((-1, 0, 1), repeat=d):
        index = [slice(None), slice(None)] + [slice(1 + o, 1 + o + s) for o, s in zip(offset, x.shape[2:])]
        shifted.append(padded[tuple(index)])
    return torch.stack(shifted, dim=2)


class GuidedFeatureDiffusion(nn.Module):
    """(features (B, C, *S), guidance (B, C_g, *S_g)) -> boundary-enhanced features (B, C, *S)."""

    def __init__(self, channels: int, guidance_channels: int, conv_op, key_channels: int = 32):
        super().__init__()
        self.theta = conv_op(guidance_channels, key_channels, 1)
        self.phi = conv_op(guidance_channels, key_channels, 1)
        self.fuse = conv_op(2 * channels, channels, 1)

    def diffusion_step(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """E = F + sum_j w_ij (F_j - F_i), eq. 17-18, in float32."""
        features = features.float()
        guidance = F.interpolate(guidance.float(), size=features.shape[2:], mode="nearest")
        query, key = self.theta(guidance), self.phi(guidance)
        inside = neighbours(torch.ones_like(features[:, :1]))  # (B, 1, 3^d, *S): 0 for neighbours beyond the border
        logits = (query.unsqueeze(2) * neighbours(key)).sum(1, keepdim=True) / math.sqrt(query.shape[1])
        weights = torch.softmax(logits.masked_fill(inside == 0, float("-inf")), dim=2)  # (B, 1, 3^d, *S)
        differences = neighbours(features) - features.unsqueeze(2)
        return features + (weights * differences).sum(dim=2)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        enhanced = self.diffusion_step(features, guidance).to(features.dtype)
        return self.fuse(torch.cat([features, enhanced], dim=1))
