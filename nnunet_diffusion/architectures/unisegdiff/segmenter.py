"""UniSegDiff's staged segmenter: staged training draws and the staged reverse run (Sec. 2.2), on the
two-headed ``UniSegDiffDenoiser``. The maths (stages, weights, jumps, the evaluation plan) is in
``diffusion.staged``; this module only runs the network along it.

Our choices where the paper is vague (docs/methods/unisegdiff.md):
- The replaced timesteps (999 in the rapid stage, 0 in the refinement stage) are what the network is
  *conditioned* on; x_t is noised at the drawn t, so the network sees every noise level of a stage, as it does
  at inference (pure noise at 999, x_299 in the last jump). Noising at 0 too would train the eps head only on
  almost clean masks, never on the x_299 it gets at inference.
- The samples (Sec. 2.2): "After sampling X_599 ten times in each of the two decoder branches, the results are
  X_299^mask and X_299^noise. Finally, the two noisy masks at t = 299 are each sampled ten times by the noise
  prediction branch, with each step directly sampling from X_299 to X_0." So each branch's chain state X_299 is
  evaluated once by the last head (its ten evaluations would be the same) and ten masks are drawn from it, each
  the ancestral (DDPM, eta = 1) jump X_299 -> X_0 with its own fresh noise: a one-step DDIM jump is deterministic,
  so the only "sampling" of one state in one step is the step's own noise. Its sigma is the DDPM posterior's
  (about 0.01 on the linear schedule), so a branch's ten masks differ near its decision boundary only.
- The last head: the x0 head (the trainer's default, chosen by measurement), which is also trained in the
  refinement stage (weight 1/4 there, 3/4 in the rapid stage) and needs no division by sqrt(abar_299); or the
  paper's eps head (``last_head='eps'``, this class's default for models stored before the setting; trainer
  nnUNetTrainerUniSegDiff_epsLastJump).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from nnunet_diffusion.architectures.segmenter import DiffusionSegmenter
from nnunet_diffusion.diffusion.gaussian import q_sample, x0_from_eps
from nnunet_diffusion.diffusion.masks import x0_from_logits
from nnunet_diffusion.diffusion.samplers import STAGED, SamplerSettings, run_reverse_process
from nnunet_diffusion.diffusion.schedules import NoiseSchedule, subschedule
from nnunet_diffusion.diffusion.staged import StagedTargets, ddim_jump, staged_inference_steps, staged_loss
from nnunet_diffusion.diffusion.timesteps import sample_timesteps


class StagedTrainingPass(NamedTuple):
    """One staged training draw. eps_hat / noise: (B, C, *S) the eps head and its target; logits: (B, C, *S) the
    x0 head; alpha, beta: (B,) the weights of L_noise and of L_dice + L_ce (eq. 1); x0_hat: the x0 head's mask
    estimate in [-1, 1], for the per-epoch pseudo-Dice."""
    eps_hat: torch.Tensor
    noise: torch.Tensor
    logits: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    x0_hat: torch.Tensor

    @property
    def output(self) -> torch.Tensor:
        """Both heads' raw outputs (B, 2C, *S), as TrainingPass.output holds the one head's."""
        return torch.cat([self.eps_hat, self.logits], dim=1)

    def loss(self, labels: torch.Tensor, segmentation_loss=None) -> torch.Tensor:
        """Eq. 1 with this draw's per-sample stage weights; labels (B, 1, *S). Its Dice + CE is per sample (the
        stage weights differ per sample), so the trainer's batch ``segmentation_loss`` is not used."""
        return staged_loss(self.eps_hat, self.noise, self.logits, labels, self.alpha, self.beta)


class StagedDiffusionSegmenter(DiffusionSegmenter):
    """Staged training and inference on a denoiser with heads ('eps', 'x0')."""

    def __init__(self, denoiser, schedule: NoiseSchedule, sampler: Optional[SamplerSettings],
                 targets: StagedTargets = StagedTargets(), last_head: str = "eps"):
        self.targets, self.last_head = targets, last_head
        staged_inference_steps(targets, targets.upper - targets.lower, schedule.num_steps, last_head)  # validates
        super().__init__(denoiser, schedule, "x0", sampler)

    def set_sampler(self, sampler: SamplerSettings, allow_untrained: bool = False) -> None:
        sampler = sampler.validated(self.schedule.num_steps)
        span = self.targets.upper - self.targets.lower
        if sampler.kind != STAGED:
            raise ValueError(f"A staged UniSegDiff model samples with sampler '{STAGED}' only, got '{sampler.kind}' "
                             f"(NNUNET_DIFFUSION_SAMPLER). Its uniform-sampling ablations are separate trainers "
                             f"(nnUNetTrainerUniSegDiff_uniformNoise, _uniformMask).")
        if span % sampler.steps:
            valid = [k for k in range(1, span + 1) if span % k == 0]
            raise ValueError(f"The staged sampler's middle stage spans t = {self.targets.upper} to "
                             f"{self.targets.lower}: {sampler.steps} DDIM steps do not divide it. Valid "
                             f"NNUNET_DIFFUSION_STEPS: {valid} (10 = the paper's interval of 30).")
        if sampler.num_samples % 2:
            raise ValueError(f"The staged sampler draws the same number of masks from each of its two branches: "
                             f"NNUNET_DIFFUSION_SAMPLES must be even, got {sampler.num_samples} (paper: 20).")
        self.sampler = sampler

    def network_calls(self) -> int:
        return len(self.inference_plan())

    def network_batch_per_patch(self) -> int:
        """Two: the mask and the noise chain; the samples are drawn from their X_lower after the last call."""
        return 2

    def inference_plan(self):
        return staged_inference_steps(self.targets, (self.targets.upper - self.targets.lower) // self.sampler.steps,
                                      self.schedule.num_steps, self.last_head)

    # ---- training -------------------------------------------------------------------------------------------

    def training_pass(self, image: torch.Tensor, x0: torch.Tensor) -> StagedTrainingPass:
        """t uniform in 0..T-1, x_t noised at t, the network conditioned on the stage's timestep; both heads."""
        features = self.denoiser.encode_image(image)
        t = sample_timesteps(image.shape[0], self.schedule.num_steps, image.device)
        noise = torch.randn_like(x0)
        x_t = q_sample(self.schedule, x0, t, noise)
        eps_hat, logits = self.denoiser(x_t, self.targets.model_timesteps(t, self.schedule.num_steps), features)
        alpha, beta = self.targets.loss_weights(t)
        return StagedTrainingPass(eps_hat, noise, logits, alpha, beta, x0_from_logits(logits))

    # ---- staged inference -----------------------------------------------------------------------------------

    def sample_x0(self, image: torch.Tensor, start_index: Optional[int] = None,
                  on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
                  x_start: Optional[torch.Tensor] = None, copies: int = 1) -> torch.Tensor:
        """(B, C_img, *S) -> (B, num_samples, C, *S) masks in [-1, 1]: the first half from the mask branch, the
        second from the noise branch. One x0 jump from pure noise, the middle DDIM steps with both branches in
        one batch, one last evaluation of both branches' X_lower (2B) and ancestral draws of the samples from it:
        ``network_calls()`` sequential evaluations.
        ``copies`` as in DiffusionSegmenter.sample_x0 (each copy starts from the same seeded noise)."""
        if start_index is not None or x_start is not None:
            raise ValueError("the staged sampler always starts from pure noise at t = T - 1")
        if image.shape[0] % copies:
            raise ValueError(f"a batch of {image.shape[0]} patches cannot hold {copies} equal copies")
        b, per_branch = image.shape[0], self.sampler.num_samples // 2
        condition = self.denoiser.encode_image(image)
        generator = torch.Generator().manual_seed(self.sampler.seed)

        def seeded_noise(*leading):
            """Noise of shape (*leading, b // copies, C, *S), drawn once and repeated for every copy (dim -2 - S)."""
            shape = (*leading, b // copies, self.num_classes, *image.shape[2:])
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(image.device)
            return torch.cat([noise] * copies, dim=len(leading))  # copy-major patches, as ``image``

        def timesteps(value, n):
            return torch.full((n,), value, dtype=torch.long, device=image.device)

        first, *middle, last = self.inference_plan()
        x = seeded_noise()
        x0_hat = x0_from_logits(self.denoiser(x, timesteps(first.model_t, b), condition, head="x0"))
        if on_step is not None:
            on_step(first.t_from, x0_hat)
        x = ddim_jump(self.schedule, x, timesteps(first.t_from, b), first.t_to, x0_hat)
        # the middle stage and the last evaluation through the one reverse loop, on the chain of their timesteps:
        # the mask chain (x0 head) and the noise chain (eps head) in one batch of 2B, branch-major; it ends with
        # each branch's X_lower evaluated once by the last head
        chains, both = torch.cat([x, x]), [torch.cat([f, f]) for f in condition]
        model_t, seen = {step.t_from: step.model_t for step in (*middle, last)}, {}

        def x0_estimates(x_k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            conditioned = timesteps(model_t[int(t[0])], 2 * b)
            if int(t[0]) == last.t_from:
                seen["x_lower"] = x_k  # the chains' state X_lower, which the samples are drawn from
                out = self.denoiser(x_k, conditioned, both, head=last.head)
                return (x0_from_logits(out) if last.head == "x0" else
                        x0_from_eps(self.schedule, x_k, t, out.float()).clamp(-1, 1))
            logits, eps_hat = self.denoiser(x_k, conditioned, both, chunk_heads=("x0", "eps")).split(b)
            return torch.cat([x0_from_logits(logits), x0_from_eps(self.schedule, x_k[b:], t[b:], eps_hat.float())])

        chain = subschedule(self.schedule, sorted(model_t))
        x0_last = run_reverse_process(x0_estimates, chains, chain, "ddim", "x0", generator,
                                      on_step=None if on_step is None else
                                      lambda k, x0: on_step(int(chain.timesteps[k]), x0))
        t_last = timesteps(last.t_from, 2 * b)

        def per_sample(x):  # (2B, ...) branch-major -> (2 * B * P, ...) in (branch, patch, sample) order
            return x.reshape(2, b, 1, *x.shape[1:]).expand(2, b, per_branch, *x.shape[1:]).flatten(0, 2)

        noise = seeded_noise(2, per_branch).transpose(1, 2).flatten(0, 2)  # (2, P, b, ...) -> (2 * b * P, ...)
        masks = ddim_jump(self.schedule, per_sample(seen["x_lower"]), per_sample(t_last), last.t_to, per_sample(x0_last),
                          eta=1.0, noise=noise).clamp(-1, 1)
        if on_step is not None:
            on_step(0, masks)
        masks = masks.reshape(2, b, per_branch, *masks.shape[1:]).transpose(0, 1)  # (B, branch, sample, C, *S)
        return masks.flatten(1, 2)
