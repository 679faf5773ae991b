"""Noise schedules and respacing.

A schedule is the sequence of cumulative signal fractions ``alpha_bar_t`` (t = 0..T-1): the forward process
is ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``. Everything else (betas, posteriors) is derived
from it, so a schedule is stored as ``alphas_cumprod`` only. All values are float64 tensors on the CPU; callers
cast and move what they index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion schedule.

    Attributes:
        alphas_cumprod: (T,) float64, strictly decreasing in (0, 1].
        timesteps: (T,) int64, the timestep index of the *trained* model that each entry corresponds to.
            For a schedule the model was trained on this is ``arange(T)``; after respacing for sampling it
            holds the original indices (e.g. 0, 111, ..., 999), which are what the network is conditioned on.
    """

    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self):
        if self.alphas_cumprod.ndim != 1 or self.alphas_cumprod.shape != self.timesteps.shape:
            raise ValueError("alphas_cumprod and timesteps must be 1-D tensors of the same length")

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """(T,) alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (the clean data)."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def betas(self) -> torch.Tensor:
        """(T,) beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}; beta_0 = 1 - alpha_bar_0."""
        return 1.0 - self.alphas_cumprod / self.alphas_cumprod_prev


def schedule_from_betas(betas: torch.Tensor) -> NoiseSchedule:
    betas = betas.to(torch.float64)
    if betas.ndim != 1 or (betas <= 0).any() or (betas >= 1).any():
        raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
    return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0), torch.arange(betas.shape[0]))


def linear_schedule(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Ho et al. (2020): betas evenly spaced from beta_start to beta_end."""
    return schedule_from_betas(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))


def cosine_schedule(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas capped at max_beta."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return schedule_from_betas(torch.tensor(betas, dtype=torch.float64))


def scaled_linear_schedule(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
    """Latent Diffusion Models (Rombach et al., 2022; Stable Diffusion's 'scaled_linear'): sqrt(beta) evenly spaced
    from sqrt(beta_start) to sqrt(beta_end). For T = 1000, alpha_bar_999 = 0.0047 (linear: 4e-5) and 35% of the
    steps have SNR > 1 (linear: 26%)."""
    return schedule_from_betas(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2)


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule, "scaled_linear": scaled_linear_schedule}


def make_schedule(name: str, num_steps: int) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"Unknown noise schedule '{name}'. Choose one of {sorted(SCHEDULES)}.")
    if num_steps < 2:
        raise ValueError(f"A noise schedule needs at least 2 steps, got {num_steps}.")
    return SCHEDULES[name](num_steps)


def check_respacing(num_steps: int, new_num_steps: int) -> None:
    """Raise a ValueError saying which step counts are valid if T cannot be respaced to K steps."""
    if new_num_steps == 1 or (2 <= new_num_steps <= num_steps and (num_steps - 1) % (new_num_steps - 1) == 0):
        return
    valid = [1] + [k for k in range(2, num_steps + 1) if (num_steps - 1) % (k - 1) == 0]
    raise ValueError(
        f"Cannot respace a {num_steps}-step schedule to {new_num_steps} steps: (T-1) must be divisible by (K-1) "
        f"so that the first and last timesteps are kept. Valid step counts for T={num_steps}: {valid}.")


def respace(schedule: NoiseSchedule, new_num_steps: int) -> NoiseSchedule:
    """Keep every s-th alpha_bar, s = (T-1)//(K-1) (the recycling paper's / ImgX-DiffSeg's respacing).

    The first and last alpha_bar are preserved, so a respaced chain still starts at (almost) pure noise and
    ends at the data. The betas of the new chain follow from alpha'_k = alpha_bar_k / alpha_bar_{k-1}.
    K = 1 keeps only the last timestep: a single x0 prediction from pure noise.
    """
    num_steps = schedule.num_steps
    check_respacing(num_steps, new_num_steps)
    if new_num_steps == 1:
        keep = torch.tensor([num_steps - 1])
    else:
        keep = torch.arange(0, num_steps, (num_steps - 1) // (new_num_steps - 1))
    return NoiseSchedule(schedule.alphas_cumprod[keep].clone(), schedule.timesteps[keep].clone())


def subschedule(schedule: NoiseSchedule, timesteps) -> NoiseSchedule:
    """The chain through ``timesteps`` (ascending, each a timestep of ``schedule``): a DDIM step from its entry k to
    k - 1 is the DDIM jump between those two timesteps of ``schedule`` (the alpha_bar of both are kept)."""
    wanted = [int(t) for t in timesteps]
    position = {int(t): i for i, t in enumerate(schedule.timesteps)}
    if wanted != sorted(set(wanted)) or any(t not in position for t in wanted):
        raise ValueError(f"timesteps {wanted} must be ascending timesteps of the schedule")
    keep = torch.tensor([position[t] for t in wanted])
    return NoiseSchedule(schedule.alphas_cumprod[keep].clone(), schedule.timesteps[keep].clone())
