"""An image-conditioned, timestep-conditioned U-Net denoiser (Diff-UNet style), for 2D and 3D.

Two encoders with the same layout (the nnU-Net plans' encoder, ``plans_encoder``): an *image encoder* that runs once
per patch, and a *noise encoder* that sees the noisy mask x_t at every reverse step. The image features and a
projection of the timestep embedding are added to the noise encoder's output at every resolution stage, and a
UNetDecoder (its unused deep-supervision heads removed, ``keep_last_seg_layer``) maps the result back to one
channel per class. ``conv_op`` (nn.Conv2d or nn.Conv3d) decides the dimensionality; nothing else is dimension
specific.
"""
from __future__ import annotations

from typing import List

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn

from nnunet_diffusion.diffusion.timesteps import timestep_embedding

# the arch_kwargs key of nnU-Net's Residual Encoder plans (ResidualEncoderUNet, -pl nnUNetPlannerResEnc*) in place of
# PlainConvUNet's n_conv_per_stage: residual blocks (BasicBlockD) per encoder stage
RESIDUAL_BLOCKS = "n_blocks_per_stage"


def keep_last_seg_layer(decoder: UNetDecoder, count: int = 1) -> UNetDecoder:
    """Replace every segmentation head of a UNetDecoder without deep supervision but the last ``count`` by
    nn.Identity.

    UNetDecoder builds a 1x1 conv head (features -> classes) per decoder stage even without deep supervision and
    uses only ``seg_layers[-1]``; the others never get a gradient, which breaks nnU-Net's multi-GPU training
    (DDP with find_unused_parameters=False). ``seg_layers[-1]`` and UNetDecoder.forward work unchanged.
    ``count`` > 1 keeps the heads of the last ``count`` stages for our own deep supervision
    (``deep_supervision_outputs``). Checkpoints saved before this change hold ``<prefix>seg_layers.<i>.*`` for the
    dropped heads: a load_state_dict pre-hook discards those keys, so such checkpoints still load strictly.
    """
    if decoder.deep_supervision:
        raise ValueError("keep_last_seg_layer is for decoders without deep supervision (all heads are used with it)")
    if not 1 <= count <= len(decoder.seg_layers):
        raise ValueError(f"count must be in 1..{len(decoder.seg_layers)} (the decoder's heads), got {count}")
    for s in range(len(decoder.seg_layers) - count):
        decoder.seg_layers[s] = nn.Identity()
    decoder.register_load_state_dict_pre_hook(_drop_dropped_seg_layer_keys)
    return decoder


def deep_supervision_heads(decoder_stages: int, deep_supervision: bool) -> int:
    """How many heads ``keep_last_seg_layer`` keeps: the last alone, or with deep supervision every stage's but the
    lowest (nnU-Net weighs that one 0; at least one)."""
    return max(1, decoder_stages - 1) if deep_supervision else 1


def deep_supervision_outputs(decoder: UNetDecoder, skips: List[torch.Tensor]) -> List[torch.Tensor]:
    """UNetDecoder.forward with deep supervision, over the heads ``keep_last_seg_layer`` kept: skips (the encoder
    stages' outputs, highest resolution first) -> the logits (B, classes, *S_s) of every decoder stage with a head,
    highest resolution first (the order of nnU-Net's deep-supervision outputs and of its targets)."""
    x, outputs = skips[-1], []
    for s in range(len(decoder.stages)):
        x = unet_decoder_stage(decoder, s, x, skips[-(s + 2)])
        if not isinstance(decoder.seg_layers[s], nn.Identity):
            outputs.append(decoder.seg_layers[s](x))
    return outputs[::-1]


def _drop_dropped_seg_layer_keys(decoder, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: remove the keys of heads that ``keep_last_seg_layer`` replaced (old checkpoints)."""
    dropped = tuple(f"{prefix}seg_layers.{s}." for s, layer in enumerate(decoder.seg_layers)
                    if isinstance(layer, nn.Identity))
    for key in [k for k in state_dict if k.startswith(dropped)]:
        del state_dict[key]


def unet_decoder_stage(decoder: UNetDecoder, s: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """UNetDecoder's stage s as its forward runs it: upsample x (the lower stage's output), concatenate the
    encoder's skip, convolve. For decoders whose stages are interleaved with other blocks."""
    return decoder.stages[s](torch.cat((decoder.transpconvs[s](x), skip), 1))


def initialize_like_nnunet(module: nn.Module) -> nn.Module:
    """nnU-Net's initialisation of its U-Nets (``PlainConvUNet.initialize``, ``ResidualEncoderUNet.initialize``):
    He-normal convolutions with leaky-ReLU slope 1e-2, zero biases, and in residual blocks the last norm before the
    addition at zero (each block starts as its shortcut); other layers keep PyTorch's default. Stock nnU-Net applies
    it when it builds a network; without it ours were not trained like for like with the stock trainer."""
    return module.apply(InitWeights_He(1e-2)).apply(init_last_bn_before_add_to_0)


def plans_encoder(in_channels: int, **encoder_kwargs) -> nn.Module:
    """The plans' encoder on ``in_channels`` inputs, returning every stage's output (the decoder's skips).

    ``encoder_kwargs``: the plans' arch_kwargs but the decoder's (n_stages, features_per_stage, conv_op, kernel_sizes,
    strides, conv_bias, norm / dropout / nonlin ops and kwargs) with PlainConvUNet's ``n_conv_per_stage`` (a
    PlainConvEncoder) or ResEnc's ``n_blocks_per_stage`` (nnU-Net's ResidualEncoder with BasicBlockD, as
    ResidualEncoderUNet builds it). The residual encoder's stem (one conv block at full resolution) runs as the
    start of stage 0, so that every stage-by-stage loop of our denoisers reads ``encoder.stages[s]`` alike."""
    if RESIDUAL_BLOCKS not in encoder_kwargs:
        return PlainConvEncoder(in_channels, **encoder_kwargs, return_skips=True)
    encoder = ResidualEncoder(in_channels, **encoder_kwargs, block=BasicBlockD, return_skips=True)
    encoder.stages[0] = nn.Sequential(encoder.stem, encoder.stages[0])
    encoder.stem = None
    return encoder


class TimestepMLP(nn.Module):
    """(B,) timesteps -> (B, dim): sinusoidal embedding followed by a two-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.dim))


class ImageConditionedDenoiser(nn.Module):
    """Denoiser f(x_t, t, image) -> (B, num_classes, *S): eps or class logits, as its user decides.

    Args: ``image_channels`` (input modalities), ``num_classes`` (channels of x_t and of the output),
    ``n_conv_per_stage_decoder`` and ``time_embed_dim``; ``encoder_kwargs`` are dynamic_network_architectures'
    U-Net encoder arguments, plain or ResEnc (``plans_encoder``), so the plans' arch_kwargs pass straight through.
    ``deep_supervision``: keep a head on every decoder stage but the lowest (nnU-Net weighs that one 0), for
    subclasses whose forward returns every head's logits (``deep_supervision_outputs``).
    """

    def __init__(self, image_channels: int, num_classes: int, n_conv_per_stage_decoder, time_embed_dim: int = 128,
                 deep_supervision: bool = False, **encoder_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.spatial_dims = convert_conv_op_to_dim(encoder_kwargs["conv_op"])
        self.image_encoder = plans_encoder(image_channels, **encoder_kwargs)
        self.noise_encoder = plans_encoder(num_classes, **encoder_kwargs)
        self.time_mlp = TimestepMLP(time_embed_dim)
        self.time_projections = nn.ModuleList(nn.Linear(time_embed_dim, f) for f in self.noise_encoder.output_channels)
        decoder = UNetDecoder(self.noise_encoder, num_classes, n_conv_per_stage_decoder, deep_supervision=False)
        self.decoder = keep_last_seg_layer(decoder, deep_supervision_heads(len(decoder.seg_layers), deep_supervision))
        initialize_like_nnunet(self)

    def encode_image(self, image: torch.Tensor) -> List[torch.Tensor]:
        """(B, image_channels, *S) -> per-stage features [(B, F_s, *S_s)]. Run once per patch."""
        return self.image_encoder(image)

    def repeat_condition(self, features: List[torch.Tensor], n: int) -> List[torch.Tensor]:
        """Repeat each patch's condition n times along the batch (samples of one patch run as one batch)."""
        return [f.repeat_interleave(n, dim=0) for f in features]

    def conditioned_stage(self, s: int, x: torch.Tensor, emb: torch.Tensor,
                          image_features: List[torch.Tensor]) -> torch.Tensor:
        """Noise-encoder stage s, plus that stage's image features and timestep projection."""
        time = self.time_projections[s](emb).reshape(*emb.shape[:1], -1, *([1] * self.spatial_dims))
        return self.noise_encoder.stages[s](x) + image_features[s] + time

    def encode_noisy(self, x_t: torch.Tensor, t: torch.Tensor,
                     image_features: List[torch.Tensor]) -> List[torch.Tensor]:
        """Noise-encoder skips with image features and the time embedding added at every stage."""
        emb = self.time_mlp(t)
        skips, x = [], x_t
        for s in range(len(self.noise_encoder.stages)):
            x = self.conditioned_stage(s, x, emb, image_features)
            skips.append(x)
        return skips

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image_features: List[torch.Tensor],
                all_scales: bool = False):
        """x_t (B, num_classes, *S), t (B,) long, image_features from encode_image -> (B, num_classes, *S); with
        ``all_scales`` (deep supervision) every kept head's logits, full resolution first."""
        skips = self.encode_noisy(x_t, t, image_features)
        return deep_supervision_outputs(self.decoder, skips) if all_scales else self.decoder(skips)
