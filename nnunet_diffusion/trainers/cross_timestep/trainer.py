"""nnUNetTrainerCrossTimestep: APDS + SC-tLSTM + FFT-tLSTM (Cross-Timestep), mask (x0 logits) prediction, T = 1000.

Why x0 and not the eps of the paper's eq. 19: the paper's appendix (training details) says "A compound loss
function, combining Dice Loss and Cross-Entropy Loss, was used to supervise the segmentation. The final loss was
computed as L = L_Dice + L_CE", and its section 4.3 says that at high noise 'Diff Out' "relies heavily on the
stable structural prior provided by APDS": both only make sense for an output that is a mask, as Diff-UNet (its
baseline) trains. An eps model's x0 estimate at t = 999 divides every error by sqrt(abar) = 0.006, and trained
so it did not segment (0.10 mean Dice against the stock trainer's 0.77). Eq. 19's eps reading is the variant
nnUNetTrainerCrossTimestep_eps.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from nnunet_diffusion.architectures.cross_timestep.network import CrossTimestepDenoiser, CrossTimestepOptions
from nnunet_diffusion.architectures.cross_timestep.segmenter import RecurrentDiffusionSegmenter
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.diffusion.schedules import check_respacing
from nnunet_diffusion.settings import read as read_setting
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase


def _whole_number(name: str) -> Optional[int]:
    raw = read_setting(name)
    if raw and (not raw.isdigit() or int(raw) < 1):
        raise ValueError(f"{name}={raw!r} must be a whole number >= 1.")
    return int(raw) if raw else None


class nnUNetTrainerCrossTimestep(nnUNetTrainerDiffusionBase):
    """The full model of the paper (eq. 20). Ablations (variants_cross_timestep.py) change ``options``.

    Training runs ``unroll_steps`` (default 1) consecutive steps of ``training_chain`` (RecurrentDiffusionSegmenter)
    after one step without gradient from a noised ground truth that fills the state, each trained with nnU-Net's
    Dice + CE on its mask logits (the prior decoder with its own Dice + CE), so the tLSTM state is trained the way
    it is used (``_burnIn``: the chain from pure noise, the steps before the drawn start without gradient); the
    chain, the options and the rest are stored with the model (plans.json) and prediction must visit exactly its
    timesteps: NNUNET_DIFFUSION_STEPS can only be its step count (the sampler kind, samples and
    seed are free). Sampling defaults to DDIM with 10 steps; the paper's 1000-step DDPM needs a model trained on
    that chain: NNUNET_DIFFUSION_CHAIN_STEPS=1000 at training, NNUNET_DIFFUSION_SAMPLER=ddpm at prediction.
    """

    noise_schedule = "linear"
    num_train_timesteps = 1000
    prediction = "x0"  # the appendix's L_Dice + L_CE on the mask (module docstring); 'eps': the _eps variant
    default_sampler = SamplerSettings(kind="ddim", steps=10)
    training_chain: Optional[SamplerSettings] = None  # None: the default sampler's kind and steps
    chain_gradient = "state"  # 'state' or 'full': see RecurrentDiffusionSegmenter
    # How the state is trained (the paper is silent): one step with gradient after one without it that fills the
    # state ('warm_state', RecurrentDiffusionSegmenter). At equal time it matched two unrolled steps from an empty
    # state (0.864 vs 0.857 at 600 s, benchmarks/results_cpu_cross_timestep_unroll_3x.md) at 0.77x their time per
    # iteration (the default before 2026-12-07: _unroll2). Burn-in from pure noise cost 1.4x per iteration and
    # reached a lower Dice (0.31 vs 0.50, benchmarks/results_cpu_methods.md).
    chain_start = "warm_state"
    options = CrossTimestepOptions()
    unroll_steps = 1
    # activation checkpointing when training on CUDA (``activation_checkpointing``, the base's 'cuda'): without it,
    # peak training memory at nnU-Net's planned patch and batch was 4.4x the stock trainer's
    # (benchmarks/gpu/memory_gpu.md); it does not change the model. ``checkpoint_levels``: only the stages at that
    # many of the finest resolution levels recompute (None: every stage, _checkpointEveryLevel), as they hold most of
    # the activations for a fraction of the compute (CrossTimestepDenoiser)
    checkpoint_levels: Optional[int] = 2

    def initialize(self):
        """nnU-Net's and the base's; the log says which levels activation checkpointing covers."""
        super().initialize()
        if self._network().denoiser.checkpoint_activations:
            levels = "every level" if self.checkpoint_levels is None else \
                f"the {self.checkpoint_levels} finest resolution levels only (checkpoint_levels)"
            self.print_to_log_file(f"Cross-Timestep checkpoints the stages at {levels}.")

    @classmethod
    def diffusion_settings(cls) -> dict:
        """Adds the training chain (``training_chain``), its gradient scheme and its length (``unroll_steps``)."""
        chain = cls.training_chain or cls.default_sampler
        return {**super().diffusion_settings(), "unroll_steps": cls.unroll_steps,
                "training_chain": {"kind": chain.kind, "steps": chain.steps}, "chain_gradient": cls.chain_gradient,
                "chain_start": cls.chain_start, "options": cls.options.to_stored()}

    @classmethod
    def training_settings(cls) -> dict:
        """At training: NNUNET_DIFFUSION_UNROLL_STEPS sets the unrolled length, NNUNET_DIFFUSION_CHAIN_STEPS the
        chain (the schedule respaced to that many steps; the stored default sampler follows it, as prediction
        must run that chain). Both are stored with the model."""
        settings = super().training_settings()
        unroll = _whole_number("NNUNET_DIFFUSION_UNROLL_STEPS")
        chain_steps = _whole_number("NNUNET_DIFFUSION_CHAIN_STEPS")
        if unroll is not None:
            settings["unroll_steps"] = unroll
        if chain_steps is not None:
            try:
                check_respacing(settings["num_train_timesteps"], chain_steps)
            except ValueError as error:
                raise ValueError(f"NNUNET_DIFFUSION_CHAIN_STEPS={chain_steps}: {error}") from None
            settings["training_chain"] = {**settings["training_chain"], "steps": chain_steps}
            settings["sampler"] = {**settings["sampler"], "steps": chain_steps}
        return settings

    @classmethod
    def build_denoiser(cls, configuration_manager, num_input_channels: int, num_classes: int,
                       stored: dict) -> nn.Module:
        # the stored options (plans.json), not the class's: a model rebuilds as it was trained
        options = CrossTimestepOptions.from_stored(stored["options"])
        return CrossTimestepDenoiser(num_input_channels, num_classes, stored["num_train_timesteps"], options,
                                     deep_supervision=stored["deep_supervision"],
                                     checkpoint_levels=cls.checkpoint_levels,  # a cost choice, not the model's
                                     **cls.plans_unet_kwargs(configuration_manager))

    @classmethod
    def build_segmenter(cls, denoiser, schedule, sampler, stored: dict):
        return RecurrentDiffusionSegmenter(denoiser, schedule, stored["prediction"], sampler,
                                           unroll_steps=stored["unroll_steps"],
                                           training_chain=SamplerSettings(**stored["training_chain"]),
                                           chain_gradient=stored["chain_gradient"],
                                           chain_start=stored["chain_start"],
                                           deep_supervision=stored["deep_supervision"])
