"""Reverse-process samplers (DDPM, DDIM) and the one reverse loop every caller shares.

The loop runs on a *sampling* schedule: the training schedule respaced to K steps (``respace``). The network is
conditioned on the original timestep indices (``schedule.timesteps``), the step maths uses the respaced
alpha_bar, exactly as in improved-DDPM / diffusers respacing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from nnunet_diffusion.settings import read as read_setting
from nnunet_diffusion.diffusion.gaussian import eps_from_x0, posterior_mean_variance, x0_from_eps, gather_coefficient
from nnunet_diffusion.diffusion.schedules import NoiseSchedule, check_respacing, respace

PREDICTIONS = ("eps", "x0")


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, k: int, x0_hat: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """Ancestral step x_{k-1} ~ q(x_{k-1} | x_k, x0_hat) with the posterior variance; no noise at k = 0."""
    t = torch.full((x_t.shape[0],), k, dtype=torch.long)
    mean, variance = posterior_mean_variance(schedule, x0_hat, x_t, t)
    return mean if k == 0 else mean + variance.sqrt() * noise


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, k: int, x0_hat: torch.Tensor,
              eps_hat: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step (eta = 0): x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1}) eps_hat."""
    t = torch.full((x_t.shape[0],), k, dtype=torch.long)
    abar_prev = gather_coefficient(schedule.alphas_cumprod_prev, t, x_t)
    return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_hat


SAMPLERS = ("ddpm", "ddim")
STAGED = "staged"  # UniSegDiff's staged inference (diffusion.staged); only its staged models sample with it
SAMPLER_KINDS = SAMPLERS + (STAGED,)
FUSIONS = ("mean", "staple")  # how the samples of a patch become class probabilities (DiffusionSegmenter.fuse)


@dataclass(frozen=True)
class SamplerSettings:
    """How the reverse process runs at prediction time. Stored with the trained model (plans.json).

    kind: 'ddpm' (ancestral, posterior variance), 'ddim' (deterministic, eta = 0), or 'staged' (UniSegDiff's
        staged inference; staged models only).
    steps: K, the number of reverse steps: the training schedule of T steps is respaced to K
        ((T-1) % (K-1) == 0, or K = 1 for a single x0 prediction from pure noise). 'staged': the DDIM steps of
        its middle stage (the segmenter checks them against its thresholds).
    num_samples: reverse runs per patch, batched together ('staged': masks per patch, half per branch).
    seed: seeds the start noise and DDPM noise of every patch: same seed, same prediction.
    fusion: how the samples of a patch become class probabilities: 'mean' (average of their probabilities) or
        'staple' (the paper's binary STAPLE EM per class in torch, on their label maps, ``diffusion.fusion``).
    """

    kind: str = "ddim"
    steps: int = 10
    num_samples: int = 1
    seed: int = 0
    fusion: str = "mean"

    def validated(self, train_steps: int) -> "SamplerSettings":
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"Unknown sampler '{self.kind}'. Choose one of {list(SAMPLER_KINDS)} "
                             f"(environment variable NNUNET_DIFFUSION_SAMPLER).")
        if self.kind != STAGED:
            check_respacing(train_steps, self.steps)
        elif self.steps < 1:
            raise ValueError(f"the staged sampler needs >= 1 middle DDIM step, got {self.steps} "
                             f"(NNUNET_DIFFUSION_STEPS).")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples} (NNUNET_DIFFUSION_SAMPLES).")
        if self.fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion '{self.fusion}'. Choose one of {list(FUSIONS)} "
                             f"(environment variable NNUNET_DIFFUSION_FUSION).")
        return self

    # the prediction-time overrides (nnunet_diffusion.settings): variable -> (field, type)
    ENV_FIELDS = {"NNUNET_DIFFUSION_SAMPLER": ("kind", str), "NNUNET_DIFFUSION_STEPS": ("steps", int),
                  "NNUNET_DIFFUSION_SAMPLES": ("num_samples", int), "NNUNET_DIFFUSION_SEED": ("seed", int),
                  "NNUNET_DIFFUSION_FUSION": ("fusion", str)}

    def with_env_overrides(self, environ=os.environ) -> "SamplerSettings":
        """Apply NNUNET_DIFFUSION_{SAMPLER,STEPS,SAMPLES,SEED,FUSION} from the environment, if set."""
        changes = {}
        for name, (field, cast) in self.ENV_FIELDS.items():
            raw = read_setting(name, environ)
            if raw is None:
                continue
            try:
                changes[field] = cast(raw.lower() if cast is str else raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}.") from None
        return replace(self, **changes)

    @classmethod
    def env_variables_set(cls, environ=os.environ) -> dict:
        """The NNUNET_DIFFUSION_{SAMPLER,STEPS,SAMPLES,SEED,FUSION} variables that are set (non-empty): name -> value."""
        return {name: value for name in cls.ENV_FIELDS if (value := read_setting(name, environ)) is not None}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "num_samples": self.num_samples, "seed": self.seed,
                "fusion": self.fusion}

    def describe(self) -> str:
        fusion = f", {self.fusion} fusion" if self.num_samples > 1 else ""
        return f"{self.kind}, {self.steps} steps, {self.num_samples} sample(s){fusion}, seed {self.seed}"


def run_reverse_process(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor,
                        schedule: NoiseSchedule, kind: str, prediction: str, generator: torch.Generator,
                        start_index: Optional[int] = None,
                        on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
                        end_index: int = 0, clip: float = 1.0,
                        project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                        project_last: bool = True) -> torch.Tensor:
    """The reverse loop, from step ``start_index`` (default K-1) down to ``end_index`` (default 0).

    Args:
        model_fn: (x_k (B, C, *S), t (B,) long original timestep indices) -> eps or x0 estimate (B, C, *S).
        x_start: (B, C, *S) the state at ``start_index`` (usually pure noise).
        schedule: the sampling schedule (already respaced).
        kind: 'ddpm' or 'ddim'. prediction: what model_fn returns, 'eps' or 'x0'.
        generator: CPU generator for the DDPM noise (drawn on the CPU so CPU and CUDA agree).
        on_step: called as on_step(k, x0_hat) after every model evaluation (analysis, e.g. collapse curves).
        end_index: stop after the model evaluation at this step (training on short unrolled chains).
        clip: x0 estimates are clipped to [-clip, clip] (1: masks; latent diffusion passes its latent's range).
        project: applied to every x0 estimate before the clip (latent diffusion: the label encoder's per-sample
            normalisation, which every true latent satisfies); the next step's eps is re-derived from the result.
        project_last: also project the estimate of the last step (the one returned); False: the steps continue
            from projected estimates, the result is the model's own.
    Returns:
        (B, C, *S) the x0 estimate of the last step evaluated, clipped to [-clip, clip].
    """
    if kind not in SAMPLERS or prediction not in PREDICTIONS:
        raise ValueError(f"kind must be one of {SAMPLERS} and prediction one of {PREDICTIONS}")
    start_index = schedule.num_steps - 1 if start_index is None else start_index
    x = x_start
    batch = x.shape[0]
    for k in range(start_index, -1, -1):
        t_k = torch.full((batch,), k, dtype=torch.long)
        out = model_fn(x, schedule.timesteps[t_k].to(x.device))
        x0_hat = out if prediction == "x0" else x0_from_eps(schedule, x, t_k, out)
        if project is not None and (project_last or k != end_index):
            x0_hat = project(x0_hat)
        # masks live in [-1, 1]; clipping the estimate (and re-deriving eps from it) keeps steps in range
        x0_hat = x0_hat.clamp(-clip, clip)
        if on_step is not None:
            on_step(k, x0_hat)
        if k == end_index:
            return x0_hat
        if kind == "ddpm":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = ddpm_step(schedule, x, k, x0_hat, noise)
        else:
            x = ddim_step(schedule, x, k, x0_hat, eps_from_x0(schedule, x, t_k, x0_hat))
    return x0_hat


def sampling_schedule(train_schedule: NoiseSchedule, settings: SamplerSettings) -> NoiseSchedule:
    return respace(train_schedule, settings.steps)


# ---- which reverse chains a trained model can run ------------------------------------------------------------------


def trained_index_count(num_steps: int, recycling: bool) -> int:
    """Training draws t uniformly from indices 0..n-1 of the training schedule; this is n.

    Recycling (Fu et al.) trains t in 0..T-2: index T-1 is where its no-gradient first pass runs. Every other
    model (eps, x0 without recycling) trains all T indices, so that the sampler's first step (index T-1, pure
    noise) is a trained one.
    """
    return num_steps - 1 if recycling else num_steps


@dataclass(frozen=True)
class TrainingCoverage:
    """What training covered, in original timestep indices (what the network is conditioned on).

    trained: timesteps whose output received gradient.
    start: a timestep that training ran only without gradient, as the first step of a chain from (almost)
        pure noise whose output the trained steps then learned to correct (recycling's t = T-1). Valid as a
        sampler's first step, never as its last (the final mask would be an untrained output).
    chain: recurrent denoisers only: the one sequence of timesteps (ascending) whose transitions the state was
        trained on; a sampler must visit exactly these. DDPM and DDIM visit the same timesteps with the same
        state transitions (they differ only in how x_{k-1} is drawn around the same x0 estimate, both aiming at
        q(x_{k-1} | x0), from which the training chain starts), so either kind may sample.
    description: one line for error messages.
    """
    trained: tuple
    start: Optional[int] = None
    chain: Optional[tuple] = None
    description: str = ""


def training_coverage(schedule: NoiseSchedule, recycling: bool = False,
                      chain_steps: Optional[int] = None) -> TrainingCoverage:
    """The coverage of the three ways this package trains (segmenters and trainers both ask this function).

    schedule: the training schedule (T steps; for recycling the 5-step respacing of 1001 steps).
    chain_steps: given for a recurrent denoiser trained on chains of ``respace(schedule, chain_steps)``.
    """
    timesteps = [int(t) for t in schedule.timesteps]
    if chain_steps is not None:
        chain = tuple(int(t) for t in respace(schedule, chain_steps).timesteps)
        return TrainingCoverage(chain, None, chain, f"its state was trained on the {chain_steps}-step chain "
                                                    f"{_short(chain)} only (the state's transitions)")
    n = trained_index_count(len(timesteps), recycling)
    if n == len(timesteps):
        return TrainingCoverage(tuple(timesteps), None, None, f"trained on all {n} timesteps")
    return TrainingCoverage(tuple(timesteps[:n]), timesteps[-1], None,
                            f"trained on timesteps {_short(timesteps[:n])}; t={timesteps[-1]} only as the "
                            f"first step from noise (recycling's no-gradient pass), never as the output")


def sampler_is_covered(schedule: NoiseSchedule, steps: int, coverage: TrainingCoverage) -> bool:
    """Whether K = ``steps`` reverse steps on ``schedule`` visit only timesteps the training covered."""
    try:
        visited = tuple(int(t) for t in respace(schedule, steps).timesteps)  # ascending; the run starts at [-1]
    except ValueError:
        return False
    if coverage.chain is not None:
        return visited == coverage.chain
    trained = set(coverage.trained)
    first_ok = visited[-1] in trained or (len(visited) >= 2 and visited[-1] == coverage.start)
    return first_ok and all(t in trained for t in visited[:-1])


def valid_sampler_steps(schedule: NoiseSchedule, coverage: TrainingCoverage) -> list:
    num_steps = schedule.num_steps
    candidates = [1] + [k for k in range(2, num_steps + 1) if (num_steps - 1) % (k - 1) == 0]
    return [k for k in candidates if sampler_is_covered(schedule, k, coverage)]


def check_sampler_coverage(schedule: NoiseSchedule, settings: SamplerSettings, coverage: TrainingCoverage) -> None:
    """Raise a ValueError naming the valid step counts if the sampler visits timesteps training did not cover."""
    if sampler_is_covered(schedule, settings.steps, coverage):
        return
    visited = [int(t) for t in respace(schedule, settings.steps).timesteps]
    raise ValueError(
        f"This model cannot sample with {settings.steps} steps (timesteps {_short(visited[::-1])}): "
        f"{coverage.description}. Valid NNUNET_DIFFUSION_STEPS for this model: "
        f"{valid_sampler_steps(schedule, coverage)} (sampler {list(SAMPLERS)} and "
        f"NNUNET_DIFFUSION_SAMPLES / SEED are free).")


def _short(values, head: int = 6) -> str:
    values = list(values)
    if len(values) <= 2 * head:
        return "[" + ", ".join(map(str, values)) + "]"
    return "[" + ", ".join(map(str, values[:head])) + ", ..., " + ", ".join(map(str, values[-2:])) + "]"
