"""nnUNetTrainerDiffSegRecycling: recycling training for DDPM segmentation (Fu et al., ImgX-DiffSeg)."""
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.base import nnUNetTrainerDiffusionBase


class nnUNetTrainerDiffSegRecycling(nnUNetTrainerDiffusionBase):
    """x0-prediction of one-hot masks in [-1, 1] with recycling, Dice + cross-entropy loss.

    As in the reference code: linear betas over 1001 steps respaced to a 5-step chain ((1001-1) % (5-1) == 0),
    which the model is trained on and sampled with (DDPM, posterior variance, no noise at the last step); the
    network sees (clip(x_t, -1, 1) + 1) / 2. The loss is nnU-Net's own Dice + CE (its first release used CE).
    """

    noise_schedule = "linear"
    beta_schedule_steps = 1001
    num_train_timesteps = 5
    prediction = "x0"
    recycling = True
    clip_noisy_input = True
    default_sampler = SamplerSettings(kind="ddpm", steps=5)
