"""3D cross-modal attention (TextDiffSeg eq. 2) and Table II's concatenation ablation (zeta_1).

Eq. 2: z_fused = z_i + reshape(softmax(z_i' W_q (z_t W_k)^T / sqrt(d_k)) z_t W_v): every voxel of the image
features is a query, each class description one key/value token. Memory is voxels x classes per head, so it fits
any latent grid nnU-Net plans. MONAI's CrossAttentionBlock computes it (plus its output projection).
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_diffusion.architectures.textdiffseg.image_encoder import attention_heads, from_tokens, tokens


class TextCrossAttention(nn.Module):
    """(features (B, F, *L), text (N, D) one row per class) -> (B, F, *L). The result does not depend on the order
    of the N text tokens (attention sums over them)."""

    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        from monai.networks.blocks import CrossAttentionBlock  # here, not at the top: importing MONAI takes seconds in every nnUNetv2_* process
        self.attention = CrossAttentionBlock(channels, attention_heads(channels), context_input_size=text_dim,
                                             use_flash_attention=True)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        context = text.to(features.dtype).unsqueeze(0).expand(features.shape[0], -1, -1)
        return features + from_tokens(self.attention(tokens(features), context=context), features)


class TextConcatenation(nn.Module):
    """Table II zeta_1: each class embedding projected to a few channels, all of them broadcast over the grid and
    concatenated to the image features, then a 1x1 conv back to F channels ("direct feature concatenation")."""

    def __init__(self, channels: int, text_dim: int, num_classes: int, conv_op, channels_per_class: int = 8):
        super().__init__()
        self.project = nn.Linear(text_dim, channels_per_class)
        self.mix = conv_op(channels + num_classes * channels_per_class, channels, 1)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        text_channels = self.project(text.to(features.dtype)).flatten()  # (N * c,)
        ones = [1] * (features.ndim - 2)
        broadcast = text_channels.reshape(1, -1, *ones).expand(features.shape[0], -1, *features.shape[2:])
        return self.mix(torch.cat([features, broadcast], dim=1))
