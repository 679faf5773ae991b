"""Small variants: each changes one thing of a trainer (nnU-Net's variants/ convention)."""
from torch import nn

from nnunet_diffusion.architectures.conditional_unet import ImageConditionedDenoiser
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.diffusion import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.recycling import nnUNetTrainerDiffSegRecycling

__all__ = ["nnUNetTrainerDiffusion_DDPM1000", "nnUNetTrainerDiffusion_cosine", "nnUNetTrainerDiffusion_x0",
           "nnUNetTrainerDiffSegRecycling_noRecycling", "nnUNetTrainerDiffSegRecycling_twoEncoders"]


class nnUNetTrainerDiffusion_DDPM1000(nnUNetTrainerDiffusion):
    """Samples with the full 1000-step ancestral DDPM chain by default (100x the cost of the 10-step DDIM)."""
    default_sampler = SamplerSettings(kind="ddpm", steps=1000)


class nnUNetTrainerDiffusion_cosine(nnUNetTrainerDiffusion):
    """Cosine noise schedule (Nichol & Dhariwal 2021) instead of linear betas."""
    noise_schedule = "cosine"


class nnUNetTrainerDiffusion_x0(nnUNetTrainerDiffusion):
    """x0-prediction (class logits, nnU-Net's Dice + CE) instead of eps, as Diff-UNet trains: at high t an eps
    target holds the mask only with weight sqrt(abar_t) (0.006 at t = 999), so a briefly trained eps model
    learns little of the mask where sampling from pure noise starts (benchmarks/results_cpu.md)."""
    prediction = "x0"


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
        return ImageConditionedDenoiser(num_input_channels, num_classes, **cls.plans_unet_kwargs(configuration_manager))
