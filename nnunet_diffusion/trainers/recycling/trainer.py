"""nnUNetTrainerDiffSegRecycling: recycling training for DDPM segmentation (Fu et al., ImgX-DiffSeg)."""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_diffusion.architectures.recycling.network import ConcatImageDenoiser
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase


class nnUNetTrainerDiffSegRecycling(nnUNetTrainerDiffusionBase):
    """x0-prediction of one-hot masks in [-1, 1] with recycling, Dice + cross-entropy loss.

    As in the reference code: linear betas over 1001 steps respaced to a 5-step chain ((1001-1) % (5-1) == 0),
    which the model is trained on and sampled with (DDPM, posterior variance, no noise at the last step; by
    default 2 of its steps, see ``default_sampler``); the
    network sees (clip(x_t, -1, 1) + 1) / 2. The loss is nnU-Net's own Dice + CE (its first release used CE).
    The network is the paper's: one U-Net (the plans' layout) on the image concatenated with the noisy mask,
    conditioned on the timestep (``ConcatImageDenoiser``). The Diff-UNet-style two-encoder network that this
    trainer used before is ``nnUNetTrainerDiffSegRecycling_twoEncoders``.
    """

    noise_schedule = "linear"
    beta_schedule_steps = 1001
    num_train_timesteps = 5
    prediction = "x0"
    recycling = True
    clip_noisy_input = True
    # 2 of the 5 trained steps: same held-out Dice as 5 (0.854 at 2, 3 and 5 steps) at 0.3-0.5x the cost
    # (benchmarks/predict_cpu_one_window.md); NNUNET_DIFFUSION_STEPS=5 (or --steps 5) runs the whole chain
    default_sampler = SamplerSettings(kind="ddpm", steps=2)

    @classmethod
    def build_denoiser(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                       num_classes: int, stored: dict) -> nn.Module:
        return ConcatImageDenoiser(num_input_channels, num_classes, deep_supervision=stored["deep_supervision"],
                                   **cls.plans_unet_kwargs(configuration_manager))
