"""Variants of the plain DDPM trainer: each changes one thing (nnU-Net's variants/ convention)."""
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion

__all__ = ["nnUNetTrainerDiffusion_DDPM1000", "nnUNetTrainerDiffusion_cosine", "nnUNetTrainerDiffusion_x0"]


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
