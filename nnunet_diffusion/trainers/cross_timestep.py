"""nnUNetTrainerCrossTimestep: APDS + SC-tLSTM + FFT-tLSTM (Cross-Timestep), eps-prediction, T = 1000."""
from __future__ import annotations

import os

from torch import nn

from nnunet_diffusion.architectures.cross_timestep_unet import CrossTimestepDenoiser, CrossTimestepOptions
from nnunet_diffusion.architectures.segmenter import RecurrentDiffusionSegmenter
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.base import nnUNetTrainerDiffusionBase


class nnUNetTrainerCrossTimestep(nnUNetTrainerDiffusionBase):
    """The full model of the paper (eq. 20). Ablations (variants_cross_timestep.py) change ``options``.

    Sampling defaults to DDIM with 10 steps; the paper's 1000-step DDPM is NNUNET_DIFFUSION_SAMPLER=ddpm
    NNUNET_DIFFUSION_STEPS=1000 (100x the cost). Training unrolls ``unroll_steps`` consecutive steps of the
    default sampling schedule (RecurrentDiffusionSegmenter), so the tLSTM state is trained the way it is used.
    """

    noise_schedule = "linear"
    num_train_timesteps = 1000
    prediction = "eps"
    default_sampler = SamplerSettings(kind="ddim", steps=10)
    options = CrossTimestepOptions()
    unroll_steps = 2

    @classmethod
    def diffusion_settings(cls) -> dict:
        """Adds the training chain length: ``unroll_steps``, or NNUNET_DIFFUSION_UNROLL_STEPS when set."""
        raw = os.environ.get("NNUNET_DIFFUSION_UNROLL_STEPS", "").strip()
        if raw and (not raw.isdigit() or int(raw) < 1):
            raise ValueError(f"NNUNET_DIFFUSION_UNROLL_STEPS={raw!r} must be a whole number >= 1.")
        return {**super().diffusion_settings(), "unroll_steps": int(raw) if raw else cls.unroll_steps}

    @classmethod
    def build_denoiser(cls, configuration_manager, num_input_channels: int, num_classes: int) -> nn.Module:
        kwargs = cls.plans_unet_kwargs(configuration_manager)
        return CrossTimestepDenoiser(num_input_channels, num_classes, cls.num_train_timesteps, cls.options, **kwargs)

    @classmethod
    def build_segmenter(cls, denoiser, schedule, sampler, stored: dict):
        return RecurrentDiffusionSegmenter(denoiser, schedule, stored["prediction"], sampler,
                                           unroll_steps=stored["unroll_steps"])
