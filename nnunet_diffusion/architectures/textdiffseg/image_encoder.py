"""Image branch (TextDiffSeg II.B.1): the image patch -> features on the latent grid, once per patch.

``ImageEncoder``: the plans' first encoder stages (nnU-Net's conv blocks, kernels and strides) down to the
latent grid, with self-attention after each of its last two downsampling stages, as the paper's "final two
down-sampling layers ... incorporate multi-head attention". Our choice where the paper is silent: keys and values
are the stage's features average-pooled to at most ``max_context`` tokens (spatial-reduction attention, as in
PVT), so memory grows with voxels x max_context instead of voxels^2 on a realistic 3d patch.
``DownsampledImage``: Table II's zeta_2, "a simple downsampling operation" instead of the encoder.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_pool_op
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

from nnunet_diffusion.architectures.conditional_unet import initialize_like_nnunet

MAX_CONTEXT_TOKENS = 512  # keys/values per attention: 512 x voxels scores (a 24^3 stage: 7M per head and patch)


def attention_heads(channels: int, head_channels: int = 32) -> int:
    """One head per ``head_channels`` channels (at least one), dividing ``channels``."""
    heads = max(1, channels // head_channels)
    while channels % heads:
        heads -= 1
    return heads


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, F, *S) -> (B, prod(S), F)."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, prod(S), F) -> (B, F, *S) shaped like ``like``."""
    return t.transpose(1, 2).reshape(like.shape[0], -1, *like.shape[2:])


class PooledSelfAttention(nn.Module):
    """x (B, F, *S) -> x + Attention(queries: every voxel of LN(x), keys/values: LN(x) average-pooled to at most
    ``max_context`` tokens). MONAI's CrossAttentionBlock with PyTorch's fused attention."""

    def __init__(self, channels: int, conv_op, max_context: int = MAX_CONTEXT_TOKENS):
        super().__init__()
        self.max_context = max_context
        self.pool = get_matching_pool_op(conv_op, pool_type="avg")
        self.norm = nn.GroupNorm(1, channels)
        from monai.networks.blocks import CrossAttentionBlock  # here, not at the top: importing MONAI takes seconds in every nnUNetv2_* process
        self.attention = CrossAttentionBlock(channels, attention_heads(channels), use_flash_attention=True)

    def context_stride(self, spatial_shape) -> int:
        """The smallest isotropic pooling stride that leaves at most ``max_context`` tokens."""
        stride = 1
        while math.prod(math.ceil(s / stride) for s in spatial_shape) > self.max_context:
            stride += 1
        return stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        stride = self.context_stride(x.shape[2:])
        context = normed if stride == 1 else self.pool(stride, stride, ceil_mode=True)(normed)
        return x + from_tokens(self.attention(tokens(normed), context=tokens(context)), x)


class ImageEncoder(nn.Module):
    """(B, C_img, *S) -> (B, out_channels, *S / prod(strides[1:])).

    features, kernel_sizes, strides, n_conv_per_stage: the plans' values for the stages used (stage 0 has stride
    1 in nnU-Net's plans); ``residual``: ResEnc plans, whose n_conv_per_stage are residual blocks (BasicBlockD) after
    a one-conv stem, as nnU-Net's ResidualEncoder; ``block_kwargs``: conv_bias, norm/dropout/nonlin ops and kwargs.
    """

    def __init__(self, image_channels: int, out_channels: int, conv_op, features, kernel_sizes, strides,
                 n_conv_per_stage, attention_stages: int = 2, residual: bool = False, **block_kwargs):
        super().__init__()
        stages, attention, previous = [], [], image_channels
        for i, (f, k, s, n) in enumerate(zip(features, kernel_sizes, strides, n_conv_per_stage)):
            if not residual:
                stages.append(StackedConvBlocks(n, conv_op, previous, f, k, s, **block_kwargs))
            else:
                stem = [StackedConvBlocks(1, conv_op, previous, f, k, 1, **block_kwargs)] if i == 0 else []
                stages.append(nn.Sequential(*stem, StackedResidualBlocks(n, conv_op, f if i == 0 else previous, f, k, s,
                                                                         **block_kwargs, block=BasicBlockD)))
            # the last ``attention_stages`` stages that downsample get self-attention
            attention.append(i >= len(features) - attention_stages and i > 0)
            previous = f
        self.stages = nn.ModuleList(stages)
        self.attention = nn.ModuleList([PooledSelfAttention(f, conv_op) if a else nn.Identity()
                                        for f, a in zip(features, attention)])
        self.head = conv_op(previous, out_channels, 1)
        initialize_like_nnunet(self)  # the plans' conv stages, initialised as stock nnU-Net's

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image
        for stage, attention in zip(self.stages, self.attention):
            x = attention(stage(x))
        return self.head(x)


class DownsampledImage(nn.Module):
    """Table II zeta_2: (B, C_img, *S) -> (B, out_channels, *L): average pooling to the latent grid and a 1x1 conv
    (the conv only gives the fusion its channel count; no spatial context is learned)."""

    def __init__(self, image_channels: int, out_channels: int, conv_op, strides):
        super().__init__()
        self.stride = [int(s) for s in torch.tensor(strides).prod(0).tolist()]
        self.pool = get_matching_pool_op(conv_op, pool_type="avg")(self.stride, self.stride)
        self.head = conv_op(image_channels, out_channels, 1)
        self.spatial_dims = convert_conv_op_to_dim(conv_op)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(image))
