"""The recycling paper's denoiser (ImgX-DiffSeg): one U-Net on [image | noisy mask], for 2D and 3D.

Fu et al. (recycling_diffseg_3d, section 4, 'Implementation'): "noise-corrupted masks and images were
concatenated along feature channels and time was encoded using sinusoidal positional embedding". So there is a
single encoder and a single decoder, built here from dynamic_network_architectures blocks with the nnU-Net
plans' layout (the plans' U-Net arguments, plain or ResEnc: ``plans_encoder``), conditioned on the timestep by a
projection of the time embedding added at every encoder stage (as in ImageConditionedDenoiser).
"""
from __future__ import annotations

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunet_diffusion.architectures.conditional_unet import (TimestepMLP, deep_supervision_heads,
                                                             deep_supervision_outputs, initialize_like_nnunet,
                                                             keep_last_seg_layer, plans_encoder)

# key prefixes of the two-encoder network (ImageConditionedDenoiser) that nnUNetTrainerDiffSegRecycling built
# before it followed the paper; see ConcatImageDenoiser._refuse_two_encoder_checkpoint
TWO_ENCODER_PREFIXES = ("image_encoder.", "noise_encoder.")


class TwoEncoderCheckpointError(RuntimeError):
    """A state dict of the earlier two-encoder recycling network was loaded into ConcatImageDenoiser."""


class ConcatImageDenoiser(nn.Module):
    """Denoiser f(x_t, t, image) -> (B, num_classes, *S): one U-Net whose input is [image | x_t].

    Shapes (S: spatial size, 2D or 3D; B: batch, samples of a patch included):
        image: (B, image_channels, *S); x_t: (B, num_classes, *S); t: (B,) long timestep indices;
        encoder input: torch.cat([image, x_t], 1), (B, image_channels + num_classes, *S);
        encoder stage s: (B, F_s, *S_s), plus the time projection (B, F_s, 1, ...) broadcast over S_s;
        output: (B, num_classes, *S) class logits (or eps, as the user of the denoiser decides).

    There is no separate image encoder: the recycling paper (ImgX-DiffSeg) concatenates the image and the noisy
    mask along the channels and feeds them to one U-Net at every reverse step. The image therefore cannot be
    encoded once per patch; ``encode_image`` returns the image itself as the condition, and the cost per step
    is that of a stock PlainConvUNet with image_channels + num_classes inputs (one encoder, one decoder), less
    than the two-encoder ImageConditionedDenoiser during training.

    Args as ImageConditionedDenoiser's (the plans' U-Net arguments, plain or ResEnc, pass straight through), and
    deep_supervision: keep a segmentation head on every decoder stage but the lowest (the one nnU-Net weighs 0),
    for ``forward(..., all_scales=True)``.
    """

    def __init__(self, image_channels: int, num_classes: int, n_conv_per_stage_decoder, time_embed_dim: int = 128,
                 deep_supervision: bool = False, **encoder_kwargs):
        super().__init__()
        self.image_channels = image_channels
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.spatial_dims = convert_conv_op_to_dim(encoder_kwargs["conv_op"])
        self.encoder = plans_encoder(image_channels + num_classes, **encoder_kwargs)
        self.time_mlp = TimestepMLP(time_embed_dim)
        self.time_projections = nn.ModuleList(nn.Linear(time_embed_dim, f) for f in self.encoder.output_channels)
        # UNetDecoder builds a seg head per stage but uses only the last without deep supervision; the unused ones
        # would get no gradient, which nnU-Net's DDP (find_unused_parameters=False) refuses: drop them
        decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision=False)
        self.decoder = keep_last_seg_layer(decoder, deep_supervision_heads(len(decoder.seg_layers), deep_supervision))
        initialize_like_nnunet(self)
        self.register_load_state_dict_pre_hook(self._refuse_two_encoder_checkpoint)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, image_channels, *S) -> the same tensor: it is concatenated to x_t at every step, nothing to
        precompute."""
        return image

    def repeat_condition(self, image: torch.Tensor, n: int) -> torch.Tensor:
        """Repeat each patch n times along the batch (samples of one patch run as one batch)."""
        return image.repeat_interleave(n, dim=0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor, all_scales: bool = False):
        """x_t (B, num_classes, *S), t (B,) long, image (B, image_channels, *S) -> (B, num_classes, *S); with
        ``all_scales`` (a deep-supervision network) the list of every kept head's logits, full resolution first."""
        emb = self.time_mlp(t)
        x = torch.cat([image, x_t], dim=1)
        skips = []
        for stage, projection in zip(self.encoder.stages, self.time_projections):
            x = stage(x) + projection(emb).reshape(*emb.shape[:1], -1, *([1] * self.spatial_dims))
            skips.append(x)
        return deep_supervision_outputs(self.decoder, skips) if all_scales else self.decoder(skips)

    @staticmethod
    def _refuse_two_encoder_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                       unexpected_keys, error_msgs) -> None:
        """Old nnUNetTrainerDiffSegRecycling checkpoints hold the two-encoder network: say so and how to use
        them, instead of a long list of missing and unexpected keys."""
        old = [k for k in state_dict if k.startswith(tuple(prefix + p for p in TWO_ENCODER_PREFIXES))]
        if not old:
            return
        raise TwoEncoderCheckpointError(
            f"This checkpoint was made with the two-encoder network (image encoder + noise encoder, keys "
            f"'{prefix}image_encoder.*', '{prefix}noise_encoder.*') that nnUNetTrainerDiffSegRecycling (and "
            f"its _noRecycling variant) built in an earlier version of nnunet-diffusion. The trainer now builds "
            f"the recycling paper's single U-Net on [image | noisy mask] (ConcatImageDenoiser), which cannot load "
            f"these weights. To predict with this checkpoint, rename its results folder "
            f"'nnUNetTrainerDiffSegRecycling__<plans>__<configuration>' (or '..._noRecycling__...') to "
            f"'nnUNetTrainerDiffSegRecycling_twoEncoders__<plans>__<configuration>' and run nnUNetv2_predict "
            f"with '-tr nnUNetTrainerDiffSegRecycling_twoEncoders'; or retrain with the current trainer.")
