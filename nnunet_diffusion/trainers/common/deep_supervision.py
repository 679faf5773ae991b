"""nnU-Net's deep supervision for 'x0' diffusion trainers: every decoder head's loss, weighted as nnU-Net weighs it.

Stock nnU-Net supervises each decoder stage's head with its own Dice + CE on the labels downsampled to that stage,
weights 1 / 2^i (i = 0 at full resolution), the lowest-resolution head at 0, normalised to sum 1
(``nnUNetTrainer._build_loss``). Its data loader downsamples the labels; ours loads one full-resolution target
(our trainers turn nnU-Net's deep supervision off), so the targets are downsampled here, as nnU-Net's
``DownsampleSegForDSTransform`` does (nearest-exact).
"""
from __future__ import annotations

from typing import Sequence

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch.nn.functional import interpolate


def deep_supervision_weights(num_outputs: int) -> list:
    """nnU-Net's weights for ``num_outputs`` heads that it would not weigh 0 (full resolution first): 1 / 2^i,
    normalised to sum 1. nnU-Net's lowest head (weight 0) is not built by our decoders (``keep_last_seg_layer``)."""
    weights = [1 / 2 ** i for i in range(num_outputs)]
    return [w / sum(weights) for w in weights]


def downsampled_target(target: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """target (B, 1, *S) labels -> (B, 1, *spatial_shape), nearest-exact as nnU-Net's DownsampleSegForDSTransform."""
    if tuple(target.shape[2:]) == tuple(spatial_shape):
        return target
    return interpolate(target.float(), list(spatial_shape), mode="nearest-exact").to(target.dtype)


def deep_supervision_loss(segmentation_loss, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """outputs: logits (B, C, *S_i) of every head, full resolution first; target (B, 1, *S) -> nnU-Net's weighted sum
    of ``segmentation_loss`` (its Dice + CE) over the heads, with nnU-Net's own DeepSupervisionWrapper."""
    targets = [downsampled_target(target, out.shape[2:]) for out in outputs]
    return DeepSupervisionWrapper(segmentation_loss, deep_supervision_weights(len(outputs)))(list(outputs), targets)


def with_deep_supervision(segmentation_loss):
    """loss(logits, target) -> the same loss that also takes a list of every head's logits (full resolution first,
    what a deep-supervision training pass hands over) and weighs them as nnU-Net (``deep_supervision_loss``)."""
    def loss(output, target):
        if isinstance(output, (list, tuple)):
            return deep_supervision_loss(segmentation_loss, output, target)
        return segmentation_loss(output, target)
    return loss
