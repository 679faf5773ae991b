"""The module nnU-Net's predictor sees: ``forward(image_patch)`` runs the whole reverse diffusion.

nnU-Net's sliding-window predictor calls ``network(patch)`` once per window (and once per mirrored copy unless
``--disable_tta``) and expects logits. :class:`DiffusionSegmenter` wraps a denoiser and a noise schedule: its
forward encodes the image once, runs the shared reverse loop (``diffusion.samplers.run_reverse_process``) for
``num_samples`` samples batched together, averages their class probabilities and returns log-probabilities,
so nnU-Net's softmax/argmax recovers exactly the averaged distribution.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
from torch import nn

from nnunet_diffusion.diffusion.gaussian import eps_from_x0, q_sample, x0_from_eps
from nnunet_diffusion.diffusion.masks import probabilities_from_x0, x0_from_logits
from nnunet_diffusion.diffusion.objectives import recycled_noisy_mask
from nnunet_diffusion.diffusion.fusion import staple_fusion
from nnunet_diffusion.diffusion.samplers import (SAMPLERS, SamplerSettings, TrainingCoverage, check_sampler_coverage,
                                                  run_reverse_process, sampling_schedule, trained_index_count,
                                                  training_coverage)
from nnunet_diffusion.diffusion.schedules import NoiseSchedule, respace
from nnunet_diffusion.diffusion.timesteps import sample_timesteps


class TrainingPass(NamedTuple):
    """What one training draw produced. output: raw denoiser output (B, C, *S) (eps or class logits);
    regression_target: the noise for 'eps' models, None for 'x0' models (compare logits with the labels);
    x0_hat: the one-step mask estimate in [-1, 1] (B, C, *S), for cheap per-epoch pseudo-Dice;
    prior_logits: an auxiliary segmentation of the image branch (APDS) trained with the labels, if any."""
    output: torch.Tensor
    regression_target: Optional[torch.Tensor]
    x0_hat: torch.Tensor
    prior_logits: Optional[torch.Tensor] = None


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
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, prediction: str,
                 sampler: Optional[SamplerSettings], clip_noisy_input: bool = False, recycling: bool = False):
        super().__init__()
        if prediction not in ("eps", "x0"):
            raise ValueError(f"prediction must be 'eps' or 'x0', got {prediction!r}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.prediction = prediction
        self.clip_noisy_input = clip_noisy_input
        self.recycling = recycling
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

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        """Raw denoiser output (eps, or class logits for 'x0') for x_t (B, C, *S) at timesteps t (B,)."""
        x_in = (x_t.clamp(-1, 1) + 1) / 2 if self.clip_noisy_input else x_t
        return self.denoiser(x_in, t, condition)

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

    def member_probabilities(self, image: torch.Tensor, copies: int = 1,
                             on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """(B, C_img, *S) -> (B, num_samples, num_classes, *S) class probabilities of every sample (``sample_x0``
        explains ``copies``); what prediction averages, and what uncertainty maps measure the spread of."""
        return probabilities_from_x0(self.sample_x0(image, on_step=on_step, copies=copies), class_dim=2)


def log_mean_probabilities(member_probabilities: torch.Tensor) -> torch.Tensor:
    """(B, M, C, *S) probabilities of M ensemble members -> (B, C, *S) log of their mean: logits whose softmax (what
    nnU-Net applies) is exactly the members' averaged distribution."""
    return torch.log(member_probabilities.mean(dim=1).clamp_min(1e-8))


CHAIN_GRADIENTS = ("state", "full")


MIN_SNR_GAMMA = 5.0  # Hang et al. 2023 (Min-SNR weighting): their recommended gamma


def min_snr_eps_weight(schedule: NoiseSchedule, k: int, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Weight of an eps-MSE at step k: min(SNR_k, gamma) / SNR_k, SNR_k = abar_k / (1 - abar_k). The weighted eps
    error equals min(SNR_k, gamma) times the x0 error: 1 where the signal is weak, bounded where it is strong."""
    abar = schedule.alphas_cumprod[k].double()
    snr = abar / (1 - abar)
    return (torch.clamp(snr, max=gamma) / snr).float()


class ChainTrainingPass(NamedTuple):
    """One unrolled training chain of an 'x0' recurrent model. step_logits: the class logits (B, C, *S) of every
    unrolled step (the steps with gradient, in chain order); x0_hat: the last step's mask estimate in [-1, 1];
    prior_logits: APDS's prior segmentation (B, C, *S), if any."""
    step_logits: List[torch.Tensor]
    x0_hat: torch.Tensor
    prior_logits: Optional[torch.Tensor] = None

    @property
    def output(self) -> torch.Tensor:
        """(L * B, C, *S) the steps' logits stacked along the batch (step-major)."""
        return torch.cat(self.step_logits)

    def loss(self, labels: torch.Tensor, segmentation_loss) -> torch.Tensor:
        """The paper's L = L_Dice + L_CE (``segmentation_loss``, nnU-Net's) on every unrolled step's mask, averaged
        over the steps (the chain length does not scale the loss), plus the same loss on the prior's logits."""
        loss = sum(segmentation_loss(logits, labels) for logits in self.step_logits) / len(self.step_logits)
        return loss if self.prior_logits is None else loss + segmentation_loss(self.prior_logits, labels)


CHAIN_STARTS = ("burn_in", "noised_truth")


class RecurrentDiffusionSegmenter(DiffusionSegmenter):
    """A segmenter whose denoiser carries state across reverse steps (Cross-Timestep's tLSTM).

    Sampling needs nothing new: the state lives in the per-patch condition that ``sample_x0`` creates. Training
    cannot draw one independent t per sample, as the state at step k depends on the steps before it, so it
    unrolls a short chain of ``training_chain`` (the training schedule respaced to ``training_chain.steps``, steps
    of kind ``training_chain.kind``; a stored training setting, independent of the prediction sampler): a random
    step k0 is drawn, and ``unroll_steps`` steps of the real reverse loop from k0 on carry gradient, the state
    carried from step to step. Prediction must visit exactly the chain's timesteps (``training_coverage``).

    prediction: 'x0' (the default trainer's: class logits, each unrolled step trained with the trainer's Dice + CE,
        ``ChainTrainingPass``) or 'eps' (each step's eps regressed onto the noise that separates that step's x_k
        from the ground truth, weighted by ``min_snr_eps_weight``).
    chain_start: how the chain reaches k0. 'noised_truth' (default): x_k0 drawn from q(x_k0 | x0) and the state
        empty at k0 (at test the state is empty only at the first step). 'burn_in': from pure noise at the
        chain's first step, the steps before k0 run without gradient with the model's own x_k and the state
        carried, as at test time (the recycling paper's train/test alignment); it costs the forward passes of
        the burn-in.
    chain_gradient: 'state' (default): each step's model input x_k is detached, gradient flows between steps
        only through the recurrent state. Why: each step's loss is then a clean per-step loss with x_k a
        constant, as in plain DDPM training, while the state still learns from later steps. 'full':
        backpropagation through x_k as well (eps targets included: the exact gradient of the summed per-step
        losses along the realised chain); variant nnUNetTrainerCrossTimestep_fullChainGradient.
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, prediction: str,
                 sampler: Optional[SamplerSettings], unroll_steps: int = 2,
                 training_chain: Optional[SamplerSettings] = None, chain_gradient: str = "state",
                 chain_start: str = "noised_truth", **kwargs):
        super().__init__(denoiser, schedule, prediction, None, **kwargs)
        if unroll_steps < 1:
            raise ValueError(f"unroll_steps must be >= 1, got {unroll_steps}")
        if chain_gradient not in CHAIN_GRADIENTS:
            raise ValueError(f"chain_gradient must be one of {CHAIN_GRADIENTS}, got {chain_gradient!r}")
        if chain_start not in CHAIN_STARTS:
            raise ValueError(f"chain_start must be one of {CHAIN_STARTS}, got {chain_start!r}")
        if training_chain is None:
            if sampler is None:
                raise ValueError("RecurrentDiffusionSegmenter needs a training_chain (or a sampler to copy it from)")
            training_chain = sampler
        self.unroll_steps = unroll_steps
        self.chain_gradient = chain_gradient
        self.chain_start = chain_start
        self.training_chain = SamplerSettings(training_chain.kind, training_chain.steps).validated(schedule.num_steps)
        self.chain_schedule = respace(schedule, self.training_chain.steps)
        if sampler is not None:
            self.set_sampler(sampler)

    def training_coverage(self) -> TrainingCoverage:
        return training_coverage(self.schedule, chain_steps=self.training_chain.steps)

    def training_pass(self, image: torch.Tensor, x0: torch.Tensor):
        schedule = self.chain_schedule
        length = min(self.unroll_steps, schedule.num_steps)
        start = int(torch.randint(length - 1, schedule.num_steps, ()))
        condition = self.denoiser.encode_image(image)
        if self.chain_start == "burn_in":
            first = schedule.num_steps - 1
            x_first = torch.randn_like(x0)
        else:
            first = start
            x_first = q_sample(schedule, x0, torch.full((x0.shape[0],), start), torch.randn_like(x0))
        outputs, targets, x0_hat = self.unroll_chain(condition, x_first, x0, start, length, first)
        prior_logits = getattr(condition, "prior_logits", None)
        if self.prediction == "x0":
            return ChainTrainingPass(outputs, x0_hat, prior_logits)
        # x_k comes from the model's previous step, not from q(x_k | x0): its eps target carries that step's x0
        # error times sqrt(SNR_k) (100x at t = 0), so unweighted, the last steps of the chain swamp the loss
        # (seen: 9.5e3 vs ~1). Min-SNR weighting bounds every step's loss by gamma times its x0 error.
        scales = [min_snr_eps_weight(schedule, k).sqrt() for k in range(start, start - length, -1)]
        return TrainingPass(torch.cat([o * w for o, w in zip(outputs, scales)]),
                            torch.cat([t * w for t, w in zip(targets, scales)]), x0_hat, prior_logits)

    def unroll_chain(self, condition, x_first: torch.Tensor, x0: torch.Tensor, start: int, length: int,
                     first: Optional[int] = None):
        """The training chain from step ``first`` (default ``start``; x_first (B, C, *S) the state there) down to
        ``start - length + 1``, the state carried in ``condition``. Steps above ``start`` (burn-in) run without
        gradient; the ``length`` steps from ``start`` on carry it. Returns (per-step raw outputs of the gradient
        steps: eps, or class logits for 'x0'; their eps targets, None for 'x0'; the last x0 estimate)."""
        schedule, visited = self.chain_schedule, []
        first = start if first is None else first
        if first < start:
            raise ValueError(f"the chain cannot start at step {first}, below its first gradient step {start}")
        step = iter(range(first, -1, -1))

        def model_fn(x, t):
            if next(step) > start:  # burn-in: the model's own chain, no graph kept
                with torch.no_grad():
                    return self.estimate(x, t, condition)
            if self.chain_gradient == "state":
                x = x.detach()  # x_k is a constant input; only the state in ``condition`` keeps its graph
            out = self.denoise(x, t, condition)
            visited.append((x, out))
            return x0_from_logits(out) if self.prediction == "x0" else out
        generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))  # fresh DDPM noise per draw
        x0_hat = run_reverse_process(model_fn, x_first, schedule, self.training_chain.kind, self.prediction,
                                     generator, start_index=first, end_index=start - length + 1)
        outputs = [out for _, out in visited]
        if self.prediction == "x0":
            return outputs, None, x0_hat
        # 'state': x is detached, so the targets are constants; 'full': they keep their graph (exact gradient)
        targets = [eps_from_x0(schedule, x, torch.full((x.shape[0],), k), x0)
                   for (x, _), k in zip(visited, range(start, start - length, -1))]
        return outputs, targets, x0_hat
