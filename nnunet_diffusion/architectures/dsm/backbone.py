"""The plans' nnU-Net U-Net as DSM's backbone (so nnU-Net's planning applies): multi-scale decoder features for the
query decoders and a full-resolution pixel embedding for the masks."""
from __future__ import annotations

import torch
from torch import nn
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from nnunet_diffusion.architectures.conditional_unet import keep_last_seg_layer


class UNetPixelDecoder(nn.Module):
    """image (B, C_img, *S) -> (features: list of (B, F_s, *S_s) from the bottleneck to the second-finest decoder
    stage, coarse to fine; pixel embedding (B, dim, *S)). Arguments: the plans' PlainConvUNet arguments; the
    decoder's last 1x1 head (nnU-Net's segmentation layer) gives the ``dim``-channel pixel embedding."""

    def __init__(self, image_channels: int, dim: int, n_stages: int, features_per_stage, conv_op, kernel_sizes,
                 strides, n_conv_per_stage, n_conv_per_stage_decoder, conv_bias=True, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None):
        super().__init__()
        self.encoder = PlainConvEncoder(image_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                        n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True)
        self.decoder = keep_last_seg_layer(UNetDecoder(self.encoder, dim, n_conv_per_stage_decoder, False))
        self.feature_channels = [self.encoder.output_channels[-1]] + \
            [self.encoder.output_channels[-(s + 2)] for s in range(len(self.decoder.stages) - 1)]

    def forward(self, image: torch.Tensor):
        skips = self.encoder(image)
        features, x = [skips[-1]], skips[-1]
        # UNetDecoder.forward's loop, keeping every stage's output (it returns only the head's)
        for s, (up, stage) in enumerate(zip(self.decoder.transpconvs, self.decoder.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            features.append(x)
        return features[:-1], self.decoder.seg_layers[-1](features[-1])
