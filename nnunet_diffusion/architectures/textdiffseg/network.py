"""TextDiffSeg's denoiser (II.B-D), assembled: image encoder + text fusion give the condition on the latent grid
once per patch; a MONAI DiffusionModelUNet (ResUNet with time embedding and self-attention) predicts the noise of
the label latent from concat(condition, z_t); the label autoencoder maps labels to latents and back.

The segmenter (``segmenter.LatentDiffusionSegmenter``) drives it; the interface is DiffusionSegmenter's
(``encode_image``, ``repeat_condition``, ``forward(z_t, t, condition)``) plus ``encode_labels`` /
``decode_labels`` / ``latent_shape``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunet_diffusion.architectures.textdiffseg.image_encoder import DownsampledImage, ImageEncoder
from nnunet_diffusion.architectures.textdiffseg.label_autoencoder import (FixedLabelReduction, LabelAutoencoder,
                                                                          LabelDecoder, LabelEncoder)
from nnunet_diffusion.architectures.textdiffseg.text_fusion import TextConcatenation, TextCrossAttention

IMAGE_BRANCHES = ("encoder", "downsample")
FUSIONS = ("attention", "concat")
LABEL_ENCODERS = ("learned", "reduction")
TEXT_SOURCES = ("prompts", "learned")


class TextDiffSegDenoiser(nn.Module):
    """Args: image_channels, num_classes; the plans' U-Net arguments (``n_stages`` ... ``nonlin_kwargs``); and
        text_dim: D of the class text embeddings (the ``text_embeddings`` buffer, (N, D), filled by the trainer and
            saved in the checkpoint), or of the learned class tokens when ``text_source='learned'``;
        latent_channels: k; latent_downsamplings: how many of the plans' downsampling stages the latent grid
            skips (2: the plans' first two strides, 4x per pooled axis);
        image_branch / text_fusion / label_encoder / text_source: the full model or a Table II ablation;
        denoiser_channels: the DiffusionModelUNet's channels per level (self-attention at the deepest level);
            with ``patch_size`` (the planned patch), levels whose grid would fall below 2 voxels are dropped;
        label_features: the label encoder's and decoder's stage channels (``stage_features``);
        freeze_label_autoencoder: built frozen (its pre-training phase unfreezes it through its own wrapper).
    """

    def __init__(self, image_channels: int, num_classes: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op, kernel_sizes, strides, n_conv_per_stage=None, n_conv_per_stage_decoder=None,
                 conv_bias: bool = True, norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None,
                 nonlin=None, nonlin_kwargs=None, *, text_dim: int, latent_channels: int = 4,
                 latent_downsamplings: int = 2, image_branch: str = "encoder", text_fusion: str = "attention",
                 label_encoder: str = "learned", text_source: str = "prompts",
                 denoiser_channels: Sequence[int] = (32, 64, 64), label_features: Sequence[int] = (16, 32),
                 freeze_label_autoencoder: bool = False,
                 patch_size: Sequence[int] | None = None, n_blocks_per_stage=None):
        super().__init__()
        for value, allowed in ((image_branch, IMAGE_BRANCHES), (text_fusion, FUSIONS),
                               (label_encoder, LABEL_ENCODERS), (text_source, TEXT_SOURCES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        n_down = min(latent_downsamplings, n_stages - 1)
        as_list = lambda v: [v] * n_stages if isinstance(v, int) else list(v)  # noqa: E731
        kernel_sizes, strides = as_list(kernel_sizes), as_list(strides)
        residual = n_blocks_per_stage is not None  # ResEnc plans: the image encoder's stages are residual
        features, n_conv = as_list(features_per_stage), as_list(n_blocks_per_stage if residual else n_conv_per_stage)
        block_kwargs = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs,
                            dropout_op=dropout_op, dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin,
                            nonlin_kwargs=nonlin_kwargs)
        self.num_classes = num_classes
        self.latent_channels = latent_channels
        self.spatial_dims = convert_conv_op_to_dim(conv_op)
        latent_strides = strides[1:1 + n_down]
        self.latent_stride = [math.prod(int(s[d]) if not isinstance(s, int) else s for s in latent_strides)
                              for d in range(self.spatial_dims)]

        if text_source == "prompts":
            self.register_buffer("text_embeddings", torch.zeros(num_classes, text_dim))
        else:  # the no-text ablation: one learned token per class in place of its description
            self.class_tokens = nn.Parameter(torch.randn(num_classes, text_dim) * 0.02)
        channels = features[n_down]
        if image_branch == "encoder":
            self.image_encoder = ImageEncoder(image_channels, channels, conv_op, features[:n_down + 1],
                                              kernel_sizes[:n_down + 1], strides[:n_down + 1], n_conv[:n_down + 1],
                                              residual=residual, **block_kwargs)
        else:
            self.image_encoder = DownsampledImage(image_channels, channels, conv_op, latent_strides)
        self.text_fusion = (TextCrossAttention(channels, text_dim) if text_fusion == "attention" else
                            TextConcatenation(channels, text_dim, num_classes, conv_op))
        # "the embedding size is consistent with that of the label embeddings": the condition has k channels too
        self.to_condition = conv_op(channels, latent_channels, 1)
        if label_encoder == "learned":
            encoder = LabelEncoder(num_classes, latent_channels, conv_op, kernel_sizes[1:1 + n_down], latent_strides,
                                   features=label_features, **block_kwargs)
        else:
            encoder = FixedLabelReduction(num_classes, latent_channels, conv_op, latent_strides)
        decoder = LabelDecoder(num_classes, latent_channels, conv_op, kernel_sizes[1:1 + n_down], latent_strides,
                               features=label_features, **block_kwargs)
        self.label_autoencoder = LabelAutoencoder(encoder, decoder)
        if freeze_label_autoencoder:
            self.label_autoencoder.requires_grad_(False)
        denoiser_channels = list(denoiser_channels)
        if patch_size is not None:  # a 1-voxel bottom level normalises a handful of values: ill-conditioned
            smallest = min(int(p) // int(s) for p, s in zip(patch_size, self.latent_stride))
            while len(denoiser_channels) > 1 and smallest < 2 ** len(denoiser_channels):
                denoiser_channels.pop()
        levels = len(denoiser_channels)
        from monai.networks.nets import DiffusionModelUNet  # here, not at the top: importing MONAI takes seconds in every nnUNetv2_* process
        self.unet = DiffusionModelUNet(self.spatial_dims, 2 * latent_channels, latent_channels, num_res_blocks=1,
                                       channels=tuple(denoiser_channels),
                                       attention_levels=tuple(i == levels - 1 for i in range(levels)),
                                       norm_num_groups=min(32, min(denoiser_channels)), num_head_channels=32,
                                       use_flash_attention=True)
        self.unet_multiple = 2 ** (levels - 1)  # the UNet halves every axis per level: pad the latent to this

    # ---- shapes ---------------------------------------------------------------------------------------------

    def latent_shape(self, spatial_shape) -> tuple:
        """Patch (*S) -> latent grid (*L)."""
        for size, stride in zip(spatial_shape, self.latent_stride):
            if size % stride:
                raise ValueError(f"patch {tuple(spatial_shape)} is not divisible by the latent stride "
                                 f"{self.latent_stride}")
        return tuple(s // st for s, st in zip(spatial_shape, self.latent_stride))

    # ---- the condition, once per patch ------------------------------------------------------------------------

    def class_text(self) -> torch.Tensor:
        """(N, D): the class descriptions' embeddings, or the learned tokens of the no-text ablation."""
        return self.text_embeddings if hasattr(self, "text_embeddings") else self.class_tokens

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C_img, *S) -> condition (B, k, *L): image features fused with the class text (eq. 2)."""
        return self.to_condition(self.text_fusion(self.image_encoder(image), self.class_text()))

    @staticmethod
    def repeat_condition(condition: torch.Tensor, n: int) -> torch.Tensor:
        return condition.repeat_interleave(n, dim=0)

    # ---- labels <-> latents -----------------------------------------------------------------------------------

    def encode_labels(self, onehot: torch.Tensor) -> torch.Tensor:
        """(B, N, *S) one-hot in [0, 1] -> (B, k, *L) float32 latent, per sample mean 0, std 1."""
        return self.label_autoencoder.encoder(onehot)

    def decode_labels(self, z: torch.Tensor) -> torch.Tensor:
        """(B, k, *L) -> (B, N, *S) class logits."""
        return self.label_autoencoder.decoder(z)

    # ---- the denoiser -----------------------------------------------------------------------------------------

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(z_t (B, k, *L), t (B,) timesteps, condition (B, k, *L)) -> eps estimate (B, k, *L)."""
        x = torch.cat([condition.to(z_t.dtype), z_t], dim=1)
        pad = [(-s) % self.unet_multiple for s in x.shape[2:]]
        if any(pad):  # F.pad lists the last axis first
            x = F.pad(x, [p for size in reversed(pad) for p in (0, size)])
        eps = self.unet(x, t)
        return eps[(slice(None), slice(None), *[slice(0, s) for s in z_t.shape[2:]])]
