"""The plans' nnU-Net U-Net as DSM's backbone (so nnU-Net's planning applies): multi-scale decoder features for the
query decoders and a full-resolution pixel embedding for the masks."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from nnunet_diffusion.architectures.conditional_unet import initialize_like_nnunet, keep_last_seg_layer, plans_encoder


class UNetPixelDecoder(nn.Module):
    """image (B, C_img, *S) -> (features: list of (B, F_s, *S_s) from the bottleneck to the second-finest decoder
    stage, coarse to fine (channels ``feature_channels``, output strides ``feature_strides``); pixel embedding
    (B, dim, *S)). Arguments: the plans' U-Net arguments (plain or ResEnc); the
    decoder's last 1x1 head (nnU-Net's segmentation layer) gives the ``dim``-channel pixel embedding."""

    def __init__(self, image_channels: int, dim: int, n_conv_per_stage_decoder, **encoder_kwargs):
        super().__init__()
        self.encoder = plans_encoder(image_channels, **encoder_kwargs)
        self.decoder = keep_last_seg_layer(UNetDecoder(self.encoder, dim, n_conv_per_stage_decoder, False))
        initialize_like_nnunet(self)  # the plans' U-Net, initialised as stock nnU-Net's
        # the encoder stage each feature has the grid of: the bottleneck, then each decoder stage's skip but the
        # full-resolution one (whose decoder stage gives the pixel embedding)
        stages = [len(self.encoder.output_channels) - 1 - s for s in range(len(self.decoder.stages))]
        self.feature_channels = [self.encoder.output_channels[s] for s in stages]
        # output stride: the largest per-axis product of the strides down to that stage (a CT's (1, 4, 4) is 4)
        strides = np.array(encoder_kwargs["strides"], dtype=int).reshape(len(self.encoder.output_channels), -1)
        output_strides = np.cumprod(strides, axis=0).max(axis=1)
        self.feature_strides = [int(output_strides[s]) for s in stages]

    def forward(self, image: torch.Tensor):
        skips = self.encoder(image)
        features, x = [skips[-1]], skips[-1]
        # UNetDecoder.forward's loop, keeping every stage's output (it returns only the head's)
        for s, (up, stage) in enumerate(zip(self.decoder.transpconvs, self.decoder.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            features.append(x)
        return features[:-1], self.decoder.seg_layers[-1](features[-1])


class SwinUNETRPixelDecoder(nn.Module):
    """The paper's backbone, MONAI's SwinUNETR (a maintained implementation), with the same outputs as
    ``UNetPixelDecoder``: features of its decoder at output strides 32, 16, 8 and 4 (coarse to fine, taken with
    forward hooks, so MONAI's forward runs unchanged) and its output head as the ``dim``-channel pixel embedding.
    Every patch axis must be divisible by 32 (``check_patch``)."""

    def __init__(self, image_channels: int, dim: int, spatial_dims: int, feature_size: int = 24):
        super().__init__()
        from monai.networks.nets import SwinUNETR
        self.swin = SwinUNETR(in_channels=image_channels, out_channels=dim, feature_size=feature_size,
                              spatial_dims=spatial_dims)
        taps = [self.swin.encoder10, self.swin.decoder5, self.swin.decoder4, self.swin.decoder3]
        self.feature_channels = [16 * feature_size, 8 * feature_size, 4 * feature_size, 2 * feature_size]
        self.feature_strides = [32, 16, 8, 4]
        self._captured: list = []
        for module in taps:
            module.register_forward_hook(lambda _module, _inputs, output: self._captured.append(output))

    @staticmethod
    def check_patch(patch_size) -> None:
        if any(int(s) % 32 for s in patch_size):
            raise ValueError(f"Swin UNETR needs every patch axis divisible by 32; the plans' patch is "
                             f"{list(patch_size)}. Use plans with such a patch (e.g. a custom planner or a plans file "
                             f"edited to 64 / 96 / 128 per axis) or the default nnU-Net backbone.")

    def forward(self, image: torch.Tensor):
        self._captured = []
        pixels = self.swin(image)
        features, self._captured = self._captured, []
        return features, pixels
