"""Cross-Timestep's segmenter: the DiffusionSegmenter whose denoiser carries state across reverse steps, trained on
unrolled chains (``RecurrentDiffusionSegmenter``, ``ChainTrainingPass``)."""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import nn

from nnunet_diffusion.architectures.segmenter import DiffusionSegmenter, TrainingPass
from nnunet_diffusion.diffusion.gaussian import eps_from_x0, q_sample
from nnunet_diffusion.diffusion.masks import x0_from_logits
from nnunet_diffusion.diffusion.objectives import min_snr_eps_weight
from nnunet_diffusion.diffusion.samplers import SamplerSettings, TrainingCoverage, run_reverse_process, training_coverage
from nnunet_diffusion.diffusion.schedules import NoiseSchedule, respace


CHAIN_GRADIENTS = ("state", "full")


class ChainTrainingPass(NamedTuple):
    """One unrolled training chain of an 'x0' recurrent model. step_logits: the class logits (B, C, *S) of every
    unrolled step (the steps with gradient, in chain order); x0_hat: the last step's mask estimate in [-1, 1];
    prior_logits: APDS's prior segmentation (B, C, *S), if any; step_lower_logits: with deep supervision, each
    step's lower-resolution heads' logits (highest resolution first)."""
    step_logits: List[torch.Tensor]
    x0_hat: torch.Tensor
    prior_logits: Optional[torch.Tensor] = None
    step_lower_logits: Optional[List[List[torch.Tensor]]] = None

    @property
    def output(self) -> torch.Tensor:
        """(L * B, C, *S) the steps' logits stacked along the batch (step-major)."""
        return torch.cat(self.step_logits)

    def loss(self, labels: torch.Tensor, segmentation_loss) -> torch.Tensor:
        """The paper's L = L_Dice + L_CE (``segmentation_loss``, nnU-Net's) on every unrolled step's mask, averaged
        over the steps (the chain length does not scale the loss), plus the same loss on the prior's logits. With
        deep supervision each step hands ``segmentation_loss`` the list of its heads' logits."""
        lower = self.step_lower_logits or [[] for _ in self.step_logits]
        loss = sum(segmentation_loss([logits, *heads] if heads else logits, labels)
                   for logits, heads in zip(self.step_logits, lower)) / len(self.step_logits)
        return loss if self.prior_logits is None else loss + segmentation_loss(self.prior_logits, labels)


CHAIN_STARTS = ("burn_in", "noised_truth", "warm_state")


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
        the burn-in. 'warm_state': x drawn from q(x_{k0+1} | x0) one chain step above k0, that step run without
        gradient to fill the state, then the unrolled steps (at the chain's first step the state stays empty, as
        at test time). Why: the recurrent weights on the state then learn even with ``unroll_steps = 1``, for one
        forward pass without a graph instead of a second step with one (truncated backpropagation).
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
            first = start + 1 if self.chain_start == "warm_state" and start < schedule.num_steps - 1 else start
            x_first = q_sample(schedule, x0, torch.full((x0.shape[0],), first), torch.randn_like(x0))
        lower = [] if self.deep_supervision else None
        outputs, targets, x0_hat = self.unroll_chain(condition, x_first, x0, start, length, first, lower)
        prior_logits = getattr(condition, "prior_logits", None)
        if self.prediction == "x0":
            return ChainTrainingPass(outputs, x0_hat, prior_logits, lower)
        # x_k comes from the model's previous step, not from q(x_k | x0): its eps target carries that step's x0
        # error times sqrt(SNR_k) (100x at t = 0), so unweighted, the last steps of the chain swamp the loss
        # (seen: 9.5e3 vs ~1). Min-SNR weighting bounds every step's loss by gamma times its x0 error.
        scales = [min_snr_eps_weight(schedule, k).sqrt() for k in range(start, start - length, -1)]
        return TrainingPass(torch.cat([o * w for o, w in zip(outputs, scales)]),
                            torch.cat([t * w for t, w in zip(targets, scales)]), x0_hat, prior_logits)

    def unroll_chain(self, condition, x_first: torch.Tensor, x0: torch.Tensor, start: int, length: int,
                     first: Optional[int] = None, lower_logits: Optional[list] = None):
        """The training chain from step ``first`` (default ``start``; x_first (B, C, *S) the state there) down to
        ``start - length + 1``, the state carried in ``condition``. Steps above ``start`` (burn-in) run without
        gradient; the ``length`` steps from ``start`` on carry it. Returns (per-step raw outputs of the gradient
        steps: eps, or class logits for 'x0'; their eps targets, None for 'x0'; the last x0 estimate).
        ``lower_logits`` (a list, deep supervision): each gradient step's lower-resolution heads are appended."""
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
            if lower_logits is not None:
                out, *lower = self.denoise(x, t, condition, all_scales=True)
                lower_logits.append(lower)
            else:
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
