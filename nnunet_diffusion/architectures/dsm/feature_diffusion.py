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


def neighbour_offsets(spatial_dims: int) -> list:
    """The 3^d offsets of a voxel's neighbourhood, itertools.product order over (-1, 0, 1) per axis."""
    return list(itertools.product((-1, 0, 1), repeat=spatial_dims))


def shifted(padded: torch.Tensor, offset: tuple, shape: tuple) -> torch.Tensor:
    """The view of a map padded by 1 on every spatial side (``F.pad(x, [1, 1] * d)``) whose voxel i is x's voxel
    i + offset (zero outside x): (B, C, *shape). A view: no copy is made, and autograd keeps only the padded map."""
    index = [slice(None), slice(None)] + [slice(1 + o, 1 + o + n) for o, n in zip(offset, shape)]
    return padded[tuple(index)]


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, C, 3^d, *S): each voxel's 3^d neighbourhood (zero outside the map), in
    ``neighbour_offsets`` order. A copy 3^d times x's size: for inspection and tests; the diffusion step itself
    works on the shifted views one offset at a time."""
    padded = F.pad(x, [1, 1] * (x.ndim - 2))
    return torch.stack([shifted(padded, o, x.shape[2:]) for o in neighbour_offsets(x.ndim - 2)], dim=2)


class GuidedFeatureDiffusion(nn.Module):
    """(features (B, C, *S), guidance (B, C_g, *S_g)) -> boundary-enhanced features (B, C, *S)."""

    def __init__(self, channels: int, guidance_channels: int, conv_op, key_channels: int = 32):
        super().__init__()
        self.theta = conv_op(guidance_channels, key_channels, 1)
        self.phi = conv_op(guidance_channels, key_channels, 1)
        self.fuse = conv_op(2 * channels, channels, 1)

    def diffusion_step(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """E = F + sum_j w_ij (F_j - F_i), eqs. 17-18, in float32, computed as sum_j w_ij F_j (the weights of each
        voxel sum to 1) one neighbour offset at a time on shifted views. Why: stacking the 3^d shifted copies kept
        27 times the feature map (and 27 times the keys) for backward in 3d."""
        features = features.float()
        guidance = F.interpolate(guidance.float(), size=features.shape[2:], mode="nearest")
        query, key = self.theta(guidance), self.phi(guidance)
        shape, offsets = features.shape[2:], neighbour_offsets(features.ndim - 2)
        pad = [1, 1] * len(shape)
        padded_key, padded_features = F.pad(key, pad), F.pad(features, pad)
        inside = F.pad(torch.ones_like(features[:, :1]), pad)  # 0 for neighbours beyond the border
        scale = 1 / math.sqrt(query.shape[1])
        logits = torch.cat([(query * shifted(padded_key, o, shape)).sum(1, keepdim=True) * scale
                            for o in offsets], dim=1)  # (B, 3^d, *S)
        outside = torch.cat([shifted(inside, o, shape) for o in offsets], dim=1) == 0
        weights = torch.softmax(logits.masked_fill(outside, float("-inf")), dim=1)  # (B, 3^d, *S)
        return sum(weights[:, k:k + 1] * shifted(padded_features, o, shape) for k, o in enumerate(offsets))

    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        enhanced = self.diffusion_step(features, guidance).to(features.dtype)
        return self.fuse(torch.cat([features, enhanced], dim=1))
