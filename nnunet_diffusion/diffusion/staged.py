"""UniSegDiff's staged diffusion (Sec. 2.2 and eq. 1 of the paper): which target a timestep trains, with which
weights, and the timesteps of staged inference. Pure maths on (B,) timestep tensors; no network.

Stages, on a T-step schedule (T = 1000 in the paper), with thresholds ``upper`` = 599 and ``lower`` = 299:
  rapid segmentation   t > upper          t is replaced by T - 1, target x0,   alpha : beta = 1 : 3
  probabilistic        lower < t <= upper t kept,                 both targets, alpha : beta = 1 : 1
  denoising refinement t <= lower         t is replaced by 0,     target eps,   alpha : beta = 3 : 1
loss = alpha * L_noise + beta * (L_dice + L_ce)   (eq. 1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from nnunet_diffusion.diffusion.gaussian import eps_from_x0, gather_coefficient
from nnunet_diffusion.diffusion.schedules import NoiseSchedule

RAPID, PROBABILISTIC, REFINEMENT = 0, 1, 2


@dataclass(frozen=True)
class StagedTargets:
    """Stage thresholds and per-stage (alpha, beta) ratios; the Table 5 ablations change the thresholds.

    The paper gives the weights as ratios only. We scale each stage's pair to alpha + beta = 1 (0.25/0.75,
    0.5/0.5, 0.75/0.25), so that no stage weighs more in total than another.
    """

    upper: int = 599
    lower: int = 299
    ratios: Tuple[Tuple[float, float], ...] = ((1, 3), (1, 1), (3, 1))  # rapid, probabilistic, refinement

    def __post_init__(self):
        if not 0 <= self.lower < self.upper:
            raise ValueError(f"staged thresholds need 0 <= lower < upper, got lower={self.lower}, upper={self.upper}")
        if len(self.ratios) != 3 or any(a < 0 or b < 0 or a + b == 0 for a, b in self.ratios):
            raise ValueError(f"ratios must be three non-negative (alpha, beta) pairs, got {self.ratios}")

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B,) stage: 0 rapid segmentation, 1 probabilistic modelling, 2 denoising refinement."""
        return torch.where(t > self.upper, RAPID, torch.where(t <= self.lower, REFINEMENT, PROBABILISTIC))

    def model_timesteps(self, t: torch.Tensor, num_steps: int) -> torch.Tensor:
        """The timestep the network is trained (and run) at: T - 1 in the rapid stage, 0 in the refinement stage."""
        if self.upper >= num_steps - 1:
            raise ValueError(f"upper threshold {self.upper} leaves no rapid stage on a {num_steps}-step schedule")
        return torch.where(t > self.upper, torch.full_like(t, num_steps - 1),
                           torch.where(t <= self.lower, torch.zeros_like(t), t))

    def loss_weights(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,) timesteps -> (alpha, beta), each (B,) float: the weights of L_noise and of L_dice + L_ce."""
        pairs = torch.tensor([[a / (a + b), b / (a + b)] for a, b in self.ratios], dtype=torch.float32)
        picked = pairs.to(t.device)[self.stage(t)]
        return picked[:, 0], picked[:, 1]


LAST_HEADS = ("eps", "x0")  # the head of the last jump, X_lower -> mask: the paper's eps head, or our x0 variant


def ddim_jump(schedule: NoiseSchedule, x_t: torch.Tensor, t_from: torch.Tensor, t_to: int,
              x0_hat: torch.Tensor, eta: float = 0.0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDIM move from x_t at timesteps t_from (B,) to timestep t_to of the same schedule:
    sqrt(abar_to) x0_hat + sqrt(1 - abar_to - sigma^2) eps_hat + sigma noise, eps_hat the noise that x0_hat implies
    for x_t and sigma = eta sqrt((1 - abar_to) / (1 - abar_from) (1 - abar_from / abar_to)): eta = 0 is
    deterministic, eta = 1 the ancestral (DDPM posterior) draw. t_to = -1 returns x0_hat (the end of the chain).
    x_t, x0_hat, noise: (B, C, *S)."""
    if t_to < 0:
        return x0_hat
    eps_hat = eps_from_x0(schedule, x_t, t_from, x0_hat)
    abar_to = gather_coefficient(schedule.alphas_cumprod, torch.full_like(t_from, t_to), x_t)
    if eta == 0:
        return abar_to.sqrt() * x0_hat + (1 - abar_to).sqrt() * eps_hat
    if noise is None:
        raise ValueError("a stochastic DDIM move (eta > 0) needs its noise")
    abar_from = gather_coefficient(schedule.alphas_cumprod, t_from, x_t)
    variance = eta ** 2 * (1 - abar_to) / (1 - abar_from) * (1 - abar_from / abar_to)
    return (abar_to.sqrt() * x0_hat + (1 - abar_to - variance).clamp_min(0).sqrt() * eps_hat
            + variance.sqrt() * noise)


@dataclass(frozen=True)
class StagedStep:
    """One network evaluation of staged inference: the chain is at ``t_from``, the network is conditioned on
    ``model_t``, and the estimate of ``head`` ('x0', 'eps', or 'chain': each chain its own head) moves it to
    ``t_to`` (-1: the final mask)."""
    t_from: int
    t_to: int
    model_t: int
    head: str


def staged_inference_steps(targets: StagedTargets = StagedTargets(), interval: int = 30,
                           num_steps: int = 1000, last_head: str = "eps") -> List[StagedStep]:
    """The evaluations of one staged reverse chain (Sec. 2.2): from pure noise at T - 1 one x0 jump to ``upper``;
    DDIM every ``interval`` steps from ``upper`` down to ``lower`` (the mask chain with the x0 head, the noise chain
    with the eps head, batched); one jump from ``lower`` to t = 0 (the mask: abar_0 = 1 - beta_0) through
    ``last_head`` ('eps', the paper's noise prediction branch, or 'x0'), drawn ancestrally per sample
    (StagedDiffusionSegmenter.sample_x0).

    With the paper's values this is 1 + (599 - 299) / 30 + 1 = 12 evaluations; the paper counts 11 (Table 4) but
    describes these 12, and we follow the description.
    """
    if (targets.upper - targets.lower) % interval:
        raise ValueError(f"interval {interval} must divide upper - lower = {targets.upper - targets.lower}")
    if last_head not in LAST_HEADS:
        raise ValueError(f"the last staged jump goes through one of the heads {list(LAST_HEADS)}, got '{last_head}'")
    middle = list(range(targets.upper, targets.lower, -interval))
    steps = [StagedStep(num_steps - 1, targets.upper, num_steps - 1, "x0")]
    steps += [StagedStep(t, t - interval, t, "chain") for t in middle]
    steps.append(StagedStep(targets.lower, 0, 0, last_head))
    return steps


def per_sample_dice_ce(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """(B, C, *S) logits, (B, 1, *S) integer labels -> (B,) cross-entropy + (1 - soft Dice) per sample.

    nnU-Net's Dice + CE (soft Dice over the foreground classes, ``smooth`` 1e-5, not batch Dice), per sample so
    that each sample can carry its own stage weight (eq. 1). Computed in float32: sums over a patch overflow
    float16.
    """
    logits, labels = logits.float(), labels[:, 0].long()
    spatial = tuple(range(2, logits.ndim))
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").flatten(1).mean(1)
    probabilities = torch.softmax(logits, dim=1)
    onehot = torch.zeros_like(probabilities).scatter_(1, labels[:, None], 1.0)
    tp = (probabilities * onehot).sum(spatial)
    fp = (probabilities * (1 - onehot)).sum(spatial)
    fn = ((1 - probabilities) * onehot).sum(spatial)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)
    return ce + 1 - dice[:, 1:].mean(1)


def staged_loss(eps_hat: torch.Tensor, noise: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Eq. 1 per sample, averaged over the batch: alpha_b * L_noise,b + beta_b * (L_dice,b + L_ce,b), with L_noise
    the eps MSE. Both terms always enter the graph (a weight of 0 included), so every parameter of both decoders
    takes part in every step (DDP). eps_hat, noise, logits: (B, C, *S); labels (B, 1, *S); alpha, beta (B,)."""
    mse = ((eps_hat.float() - noise.float()) ** 2).flatten(1).mean(1)
    return (alpha * mse + beta * per_sample_dice_ce(logits, labels)).mean()
