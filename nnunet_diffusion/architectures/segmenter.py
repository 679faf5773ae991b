"""The module nnU-Net's predictor sees: ``forward(image_patch)`` runs the whole reverse diffusion.

nnU-Net's sliding-window predictor calls ``network(patch)`` once per window (and once per mirrored copy unless
``--disable_tta``) and expects logits. :class:`DiffusionSegmenter` wraps a denoiser and a noise schedule: its
forward encodes the image once, runs the shared reverse loop (``diffusion.samplers.run_reverse_process``) for
``num_samples`` samples batched together, averages their class probabilities and returns log-probabilities,
so nnU-Net's softmax/argmax recovers exactly the averaged distribution.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from nnunet_diffusion.diffusion.gaussian import q_sample, x0_from_eps
from nnunet_diffusion.diffusion.masks import probabilities_from_x0, x0_from_logits
from nnunet_diffusion.diffusion.objectives import recycled_noisy_mask
from nnunet_diffusion.diffusion.fusion import staple_fusion
from nnunet_diffusion.diffusion.samplers import (SAMPLERS, SamplerSettings, TrainingCoverage, check_sampler_coverage,
                                                  run_reverse_process, sampling_schedule, trained_index_count,
                                                  training_coverage)
from nnunet_diffusion.diffusion.schedules import NoiseSchedule
from nnunet_diffusion.diffusion.timesteps import sample_timesteps


class TrainingPass(NamedTuple):
    """What one training draw produced. output: raw denoiser output (B, C, *S) (eps or class logits);
    regression_target: the noise for 'eps' models, None for 'x0' models (compare logits with the labels);
    x0_hat: the one-step mask estimate in [-1, 1] (B, C, *S), for cheap per-epoch pseudo-Dice;
    prior_logits: an auxiliary segmentation of the image branch (APDS) trained with the labels, if any;
    lower_scale_logits: with deep supervision, the logits (B, C, *S_s) of the decoder's lower-resolution heads,
    highest resolution first (``output`` is the full-resolution one)."""
    output: torch.Tensor
    regression_target: Optional[torch.Tensor]
    x0_hat: torch.Tensor
    prior_logits: Optional[torch.Tensor] = None
    lower_scale_logits: Optional[Sequence[torch.Tensor]] = None


class DiffusionSegmenter(nn.Module):
    """Denoiser + schedule + sampler settings.

    Args:
        denoiser: module with ``encode_image(image) -> condition`` (once per patch),
            ``repeat_condition(condition, n)`` and ``forward(x_in, t, condition) -> out``.
        schedule: the training schedule (T steps); sampling respaces it to ``sampler.steps``.
        prediction: 'eps' (the denoiser returns noise) or 'x0' (it returns class logits and the mask estimate
            is softmax(logits) * 2 - 1, as in the recycling paper).
        sampler: default sampler settings (validated against T and against what training covered, see
            ``set_sampler``). None: set later with ``set_sampler`` (subclasses whose check needs more state).
        clip_noisy_input: feed (clip(x_t, -1, 1) + 1) / 2 instead of x_t (the recycling reference does this).
        recycling: train 'x0' models on recycled noisy masks (``diffusion.objectives.recycled_noisy_mask``).
        deep_supervision: 'x0' models only: the training draw asks the denoiser for every head's logits
            (``forward(..., all_scales=True)``) and returns the lower ones as ``lower_scale_logits``.
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, prediction: str,
                 sampler: Optional[SamplerSettings], clip_noisy_input: bool = False, recycling: bool = False,
                 deep_supervision: bool = False):
        super().__init__()
        if prediction not in ("eps", "x0"):
            raise ValueError(f"prediction must be 'eps' or 'x0', got {prediction!r}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.prediction = prediction
        self.clip_noisy_input = clip_noisy_input
        self.recycling = recycling
        if deep_supervision and prediction != "x0":
            raise ValueError("deep supervision supervises class logits: it needs prediction 'x0'")
        self.deep_supervision = deep_supervision
        if sampler is not None:
            self.set_sampler(sampler)

    @property
    def num_classes(self) -> int:
        return self.denoiser.num_classes

    def training_coverage(self) -> TrainingCoverage:
        """Which timesteps training covered (``diffusion.samplers.training_coverage``, the one place that knows)."""
        return training_coverage(self.schedule, recycling=self.prediction == "x0" and self.recycling)

    def set_sampler(self, sampler: SamplerSettings, allow_untrained: bool = False) -> None:
        """Validate and use ``sampler``. A sampler that visits timesteps the model was never trained on is refused
        with the valid step counts in the message; ``allow_untrained=True`` skips that (analysis only)."""
        sampler = sampler.validated(self.schedule.num_steps)
        if sampler.kind not in SAMPLERS:
            raise ValueError(f"Sampler '{sampler.kind}' is for UniSegDiff's staged models; this model samples with "
                             f"{list(SAMPLERS)} (NNUNET_DIFFUSION_SAMPLER).")
        if not allow_untrained:
            check_sampler_coverage(self.schedule, sampler, self.training_coverage())
        self.sampler = sampler
        self.sampling_schedule = sampling_schedule(self.schedule, self.sampler)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Training-schedule indices (B,) -> the timestep values the denoiser is conditioned on (for a respaced
        training schedule, e.g. recycling's 5 steps out of 1001, these are the original indices 0..1000)."""
        return self.schedule.timesteps[t.cpu()].to(t.device)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition, all_scales: bool = False):
        """Raw denoiser output (eps, or class logits for 'x0') for x_t (B, C, *S) at timesteps t (B,);
        ``all_scales``: the list of every head's logits, full resolution first (deep supervision)."""
        x_in = (x_t.clamp(-1, 1) + 1) / 2 if self.clip_noisy_input else x_t
        return self.denoiser(x_in, t, condition, all_scales=True) if all_scales else self.denoiser(x_in, t, condition)

    def estimate(self, x_t: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        """What the sampler needs: eps for 'eps' models, the mask estimate in [-1, 1] for 'x0' models."""
        out = self.denoise(x_t, t, condition)
        return x0_from_logits(out) if self.prediction == "x0" else out

    def sample_x0(self, image: torch.Tensor, start_index: Optional[int] = None,
                  on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
                  x_start: Optional[torch.Tensor] = None, copies: int = 1) -> torch.Tensor:
        """Run the reverse process for ``num_samples`` samples per image.

        image: (B, C_img, *S). x_start: (B * num_samples, C, *S) state at ``start_index`` (default: seeded
        pure noise). copies: ``image`` stacks ``copies`` versions (e.g. mirrored) of B / copies patches,
        copy-major; each copy starts from the noise a run of that copy alone would draw, so batching the copies
        of a deterministic sampler gives what running them one by one gives (nnU-Net's sequential mirroring).
        Returns the final mask estimate (B, num_samples, num_classes, *S) in [-1, 1].
        """
        n = self.sampler.num_samples
        if image.shape[0] % copies:
            raise ValueError(f"a batch of {image.shape[0]} patches cannot hold {copies} equal copies")
        condition = self.denoiser.repeat_condition(self.denoiser.encode_image(image), n)
        generator = torch.Generator().manual_seed(self.sampler.seed)
        shape = (image.shape[0] // copies * n, self.num_classes, *image.shape[2:])
        noise = torch.randn(shape, generator=generator, dtype=image.dtype).to(image.device)
        x_start = noise.repeat(copies, *[1] * (noise.ndim - 1)) if x_start is None else x_start
        x0 = run_reverse_process(lambda x, t: self.estimate(x, t, condition), x_start, self.sampling_schedule,
                                 self.sampler.kind, self.prediction, generator, start_index, on_step)
        return x0.reshape(image.shape[0], n, *x0.shape[1:])

    def training_pass(self, image: torch.Tensor, x0: torch.Tensor) -> TrainingPass:
        """One training draw: random t, noisy mask, denoiser output.

        image (B, C_img, *S); x0 (B, num_classes, *S) the ground truth in [-1, 1].
        'eps' models: t uniform in 0..T-1, target = the noise (the caller regresses onto it).
        'x0' models: with ``recycling``, t uniform in 0..T-2 and x_t the recycled noisy mask (T-1 is the recycling
        pass); without, t uniform in 0..T-1 (the sampler starts at T-1, so it must be trained). The caller
        compares the logits with the labels.
        """
        num_steps = self.schedule.num_steps
        features = self.denoiser.encode_image(image)
        if self.prediction == "eps":
            t = sample_timesteps(image.shape[0], num_steps, image.device)
            noise = torch.randn_like(x0)
            x_t = q_sample(self.schedule, x0, t, noise)
            eps_hat = self.denoise(x_t, self.model_timesteps(t), features)
            x0_hat = x0_from_eps(self.schedule, x_t, t, eps_hat.float()).clamp(-1, 1)
            return TrainingPass(eps_hat, noise, x0_hat)
        t = sample_timesteps(image.shape[0], trained_index_count(num_steps, self.recycling), image.device)
        if self.recycling:
            x_t = recycled_noisy_mask(lambda x, s: self.estimate(x, self.model_timesteps(s), features),
                                      x0, self.schedule, t)
        else:
            x_t = q_sample(self.schedule, x0, t, torch.randn_like(x0))
        if self.deep_supervision:
            logits, *lower = self.denoise(x_t, self.model_timesteps(t), features, all_scales=True)
            return TrainingPass(logits, None, x0_from_logits(logits), lower_scale_logits=lower)
        logits = self.denoise(x_t, self.model_timesteps(t), features)
        return TrainingPass(logits, None, x0_from_logits(logits))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, plus what a submodule can say about a checkpoint that does not fit (``load_mismatch_hint``,
        e.g. APDS fusion weights of an older RA block) in front of torch's list of keys."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            hints = [hint for name, module in self.named_modules() if hasattr(module, "load_mismatch_hint")
                     for hint in [module.load_mismatch_hint(state_dict, name + "." if name else "")] if hint]
            if not hints:
                raise
            raise RuntimeError("\n".join(dict.fromkeys(hints)) + f"\n\n{error}") from error

    # what torch.compile compiles (architectures/compilation.py): the network each step runs, not the loop around it
    compile_targets = ("denoiser",)

    # nnU-Net's predictor wraps the whole network in torch.compile under nnUNet_compile=1: this loop stays eager
    # (dynamo would unroll every step into one graph) and the compiled denoiser inside it runs compiled
    @torch.compiler.disable
    def forward(self, image: torch.Tensor, x0: Optional[torch.Tensor] = None):
        """Inference (x0 None): (B, C_img, *S) -> (B, num_classes, *S) log of the sample-averaged class
        probabilities. Training (x0 given): a :class:`TrainingPass` (through forward so DDP sees it)."""
        if x0 is not None:
            return self.training_pass(image, x0)
        return self.fuse(self.member_probabilities(image))

    def fuse(self, member_probabilities: torch.Tensor) -> torch.Tensor:
        """(B, M, C, *S) probabilities of each patch's M samples -> (B, C, *S) logits (log-probabilities) of their
        fusion: the mean of their probabilities, or STAPLE on their label maps (``sampler.fusion``)."""
        if self.sampler.fusion == "mean" or member_probabilities.shape[1] == 1:
            return log_mean_probabilities(member_probabilities)
        fused = staple_fusion(member_probabilities.argmax(dim=2), member_probabilities.shape[2])
        return torch.log(fused.clamp_min(1e-8)).to(member_probabilities.dtype)

    def network_calls(self) -> int:
        """Sequential denoiser evaluations of one reverse run (progress bars, cost tables)."""
        return self.sampler.steps

    def network_batch_per_patch(self) -> int:
        """How many members of the denoiser's batch one patch takes in a reverse run (what prediction's
        ``--max_batch`` budgets): each of its samples runs through the network."""
        return self.sampler.num_samples

    def member_probabilities(self, image: torch.Tensor, copies: int = 1,
                             on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """(B, C_img, *S) -> (B, num_samples, num_classes, *S) class probabilities of every sample (``sample_x0``
        explains ``copies``); what prediction averages, and what uncertainty maps measure the spread of."""
        return probabilities_from_x0(self.sample_x0(image, on_step=on_step, copies=copies), class_dim=2)


def log_mean_probabilities(member_probabilities: torch.Tensor) -> torch.Tensor:
    """(B, M, C, *S) probabilities of M ensemble members -> (B, C, *S) log of their mean: logits whose softmax (what
    nnU-Net applies) is exactly the members' averaged distribution."""
    return torch.log(member_probabilities.mean(dim=1).clamp_min(1e-8))
