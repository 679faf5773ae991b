"""Label embedding (TextDiffSeg II.C): one-hot labels <-> a k-channel latent on a coarser grid.

``LabelEncoder``: a light conv encoder (residual stages with the plans' strides) ending in a normalisation over
the whole latent of each sample (mean 0, standard deviation 1, as LDSeg's LayerNorm over the latent), so the
latents diffuse like N(0, I) noise expects. ``LabelDecoder``: ResUNet-like without skips (transposed convs and
residual blocks) back to class logits; the softmax is applied by the loss and by the segmenter.
``FixedLabelReduction``: Table II's zeta_3, "a basic dimensionality reduction" instead of the learned encoder.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from dynamic_network_architectures.building_blocks.helper import (convert_conv_op_to_dim, get_matching_convtransp,
                                                                  get_matching_pool_op)
from dynamic_network_architectures.building_blocks.residual import BasicBlockD


def normalise_latent(z: torch.Tensor) -> torch.Tensor:
    """(B, k, *L) -> per sample mean 0, std 1 over all of (k, *L). Computed in float32: a sum over a 3d latent
    can exceed float16's range under autocast."""
    return F.layer_norm(z.float(), z.shape[1:], eps=1e-5)


def stage_features(features: Sequence[int], stages: int) -> list:
    """The channels of ``stages`` downsampling stages: ``features`` cut to that many, doubled beyond its end."""
    features = list(features)
    while len(features) < stages:
        features.append(2 * features[-1])
    return features[:stages]


def _blocks(conv_op, channels: Sequence[int], kernel_sizes, strides, block_kwargs: dict) -> nn.Sequential:
    """One residual block per stage: channels[i] -> channels[i + 1] with strides[i]."""
    return nn.Sequential(*[BasicBlockD(conv_op, channels[i], channels[i + 1], kernel_sizes[i], strides[i],
                                       **block_kwargs) for i in range(len(strides))])


class LabelEncoder(nn.Module):
    """(B, N, *S) one-hot labels in [0, 1] -> (B, k, *S / prod(strides)) normalised latent.

    strides: the plans' strides of the stages the latent grid skips (e.g. [[2, 2, 2], [2, 2, 2]]: 4x coarser).
    """

    def __init__(self, num_classes: int, latent_channels: int, conv_op, kernel_sizes, strides,
                 features: Sequence[int] = (16, 32), **block_kwargs):
        super().__init__()
        features = stage_features(features, len(strides))
        channels = [num_classes, features[0], *features]  # a stride-1 stem, then one block per stride
        self.blocks = _blocks(conv_op, channels, [kernel_sizes[0], *kernel_sizes], [1, *strides], block_kwargs)
        self.head = conv_op(channels[-1], latent_channels, 1)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return normalise_latent(self.head(self.blocks(onehot)))


class LabelDecoder(nn.Module):
    """(B, k, *L) latent -> (B, N, *L * prod(strides)) class logits. No skips: the latent is all it sees."""

    def __init__(self, num_classes: int, latent_channels: int, conv_op, kernel_sizes, strides,
                 features: Sequence[int] = (16, 32), **block_kwargs):
        super().__init__()
        transpconv = get_matching_convtransp(conv_op)
        features = stage_features(features, len(strides))
        self.stem = BasicBlockD(conv_op, latent_channels, features[-1], kernel_sizes[-1], 1, **block_kwargs)
        ups, blocks = [], []
        for i in reversed(range(len(strides))):  # coarse to fine, mirroring the encoder
            source, target = features[min(i + 1, len(features) - 1)], features[i]
            ups.append(transpconv(source, target, strides[i], strides[i]))
            blocks.append(BasicBlockD(conv_op, target, target, kernel_sizes[i], 1, **block_kwargs))
        self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.head = conv_op(features[0], num_classes, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stem(z)
        for up, block in zip(self.ups, self.blocks):
            x = block(up(x))
        return self.head(x)


class FixedLabelReduction(nn.Module):
    """Table II zeta_3: (B, N, *S) one-hot -> (B, k, *L): average pooling to the latent grid and a fixed (seeded,
    not trained) orthonormal projection of the N class fractions onto k channels, then the same normalisation.
    Nothing in it learns: the decoder has to undo a generic reduction."""

    def __init__(self, num_classes: int, latent_channels: int, conv_op, strides, seed: int = 0):
        super().__init__()
        self.stride = [int(s) for s in torch.tensor(strides).prod(0).tolist()]
        self.pool = get_matching_pool_op(conv_op, pool_type="avg")
        generator = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(max(num_classes, latent_channels), latent_channels,
                                               generator=generator))
        self.register_buffer("projection", basis[:num_classes].T.contiguous())  # (k, N)
        self.spatial_dims = convert_conv_op_to_dim(conv_op)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        fractions = self.pool(self.stride, self.stride)(onehot.float())
        z = torch.einsum("kn,bn...->bk...", self.projection, fractions)
        return normalise_latent(z)


class LabelAutoencoder(nn.Module):
    """encoder: one-hot (B, N, *S) -> latent (B, k, *L); decoder: latent -> logits (B, N, *S).
    ``forward(onehot)`` is the reconstruction (B, N, *S) logits, what its pre-training phase trains."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(onehot))
