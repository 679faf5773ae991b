"""nnUNetTrainerDiffusion: the plain image-conditioned DDPM baseline ('Diff' in the Cross-Timestep paper)."""
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.base import nnUNetTrainerDiffusionBase


class nnUNetTrainerDiffusion(nnUNetTrainerDiffusionBase):
    """eps-prediction, uniform timesteps, linear betas, T = 1000 (Ho et al. 2020).

    Sampling defaults to DDIM with 10 steps (Diff-UNet's test setting: 100x cheaper than the 1000-step DDPM
    chain); NNUNET_DIFFUSION_SAMPLER=ddpm NNUNET_DIFFUSION_STEPS=1000 runs the full ancestral chain.
    """

    noise_schedule = "linear"
    num_train_timesteps = 1000
    prediction = "eps"
    default_sampler = SamplerSettings(kind="ddim", steps=10)
