"""Variants of the recycling trainer: each changes one thing (nnU-Net's variants/ convention)."""
from torch import nn

from nnunet_diffusion.architectures.conditional_unet import ImageConditionedDenoiser
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling

__all__ = ["nnUNetTrainerDiffSegRecycling_noRecycling", "nnUNetTrainerDiffSegRecycling_twoEncoders",
           "nnUNetTrainerDiffSegRecycling_deepSupervision"]


class nnUNetTrainerDiffSegRecycling_noRecycling(nnUNetTrainerDiffSegRecycling):
    """Ablation: the x0 model trained on the noised ground truth instead of its own recycled prediction."""
    recycling = False


class nnUNetTrainerDiffSegRecycling_twoEncoders(nnUNetTrainerDiffSegRecycling):
    """The Diff-UNet-style two-encoder denoiser (image encoder + noise encoder, features added) instead of the
    paper's single U-Net on [image | noisy mask]; nnUNetTrainerDiffSegRecycling's network before it followed the
    paper, so its old checkpoints predict with this trainer (after renaming the results folder)."""

    @classmethod
    def build_denoiser(cls, configuration_manager, num_input_channels: int, num_classes: int,
                       stored: dict) -> nn.Module:
        return ImageConditionedDenoiser(num_input_channels, num_classes,
                                        **cls.plans_unet_kwargs(configuration_manager))


class nnUNetTrainerDiffSegRecycling_deepSupervision(nnUNetTrainerDiffSegRecycling):
    """nnU-Net's deep supervision on the U-Net's decoder heads (trainers/common/deep_supervision.py): the paper trains
    the last output alone, stock nnU-Net every stage. Measured once on the second dataset, 0.838 against the
    default's 0.853 (benchmarks/results_cpu_deep_supervision_505.md)."""
    deep_supervision = True
