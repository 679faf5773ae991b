"""UniSegDiff ablations (Tables 4, 5 and 6 of the paper): each changes one thing of nnUNetTrainerUniSegDiff."""
from dataclasses import replace

from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.diffusion.staged import StagedTargets
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff

__all__ = ["nnUNetTrainerUniSegDiff_uniformNoise", "nnUNetTrainerUniSegDiff_uniformMask",
           "nnUNetTrainerUniSegDiff_oneStep", "nnUNetTrainerUniSegDiff_noPretraining",
           "nnUNetTrainerUniSegDiff_noDCA", "nnUNetTrainerUniSegDiff_noFusion", "nnUNetTrainerUniSegDiff_baseline",
           "nnUNetTrainerUniSegDiff_low200", "nnUNetTrainerUniSegDiff_low400", "nnUNetTrainerUniSegDiff_high700",
           "nnUNetTrainerUniSegDiff_noCheckpointing", "nnUNetTrainerUniSegDiff_epsLastJump",
           "nnUNetTrainerUniSegDiff_dcaMaxTokens1024"]

# the paper's 100 uniform DDIM steps do not respace T = 1000 evenly ((T - 1) % (K - 1) == 0); 112 is the nearest
# step count that does
UNIFORM_DDIM = SamplerSettings(kind="ddim", steps=112)
_FULL = nnUNetTrainerUniSegDiff.options


class nnUNetTrainerUniSegDiff_uniformNoise(nnUNetTrainerUniSegDiff):
    """Table 4 'Uniform, noise': one eps decoder, t uniform, DDIM sampling (112 steps)."""
    options = replace(_FULL, staged=None, heads=("eps",))
    prediction, default_sampler = "eps", UNIFORM_DDIM


class nnUNetTrainerUniSegDiff_uniformMask(nnUNetTrainerUniSegDiff):
    """Table 4 'Uniform, mask': one x0 decoder (nnU-Net's Dice + CE), t uniform, DDIM sampling (112 steps)."""
    options = replace(_FULL, staged=None, heads=("x0",))
    prediction, default_sampler = "x0", UNIFORM_DDIM


class nnUNetTrainerUniSegDiff_oneStep(nnUNetTrainerUniSegDiff_uniformMask):
    """Table 4 'One-step, mask': the uniform mask model, one x0 prediction from pure noise at t = 999."""
    default_sampler = SamplerSettings(kind="ddim", steps=1)


class nnUNetTrainerUniSegDiff_noPretraining(nnUNetTrainerUniSegDiff):
    """Table 6 without 'Pre-Tra': the condition encoder is trained jointly with DNet, never frozen."""
    options = replace(_FULL, condition_network="joint")


class nnUNetTrainerUniSegDiff_noDCA(nnUNetTrainerUniSegDiff):
    """Table 6 without 'DCA': condition features added to DNet's at every stage (Diff-UNet's fusion)."""
    options = replace(_FULL, dca=False)


class nnUNetTrainerUniSegDiff_noFusion(nnUNetTrainerUniSegDiff):
    """Table 6 without 'Fusion': the 20 masks averaged (mean of probabilities) instead of STAPLE."""
    default_sampler = SamplerSettings(kind="staged", steps=10, num_samples=20, fusion="mean")


class nnUNetTrainerUniSegDiff_baseline(nnUNetTrainerUniSegDiff_uniformMask):
    """Table 6's first row: uniform x0 training, no pre-training, no DCA, no fusion."""
    options = replace(nnUNetTrainerUniSegDiff_uniformMask.options, condition_network="joint", dca=False)


class nnUNetTrainerUniSegDiff_low200(nnUNetTrainerUniSegDiff):
    """Table 5: low threshold 200 (t <= 199 is the refinement stage)."""
    options = replace(_FULL, staged=StagedTargets(upper=599, lower=199))


class nnUNetTrainerUniSegDiff_low400(nnUNetTrainerUniSegDiff):
    """Table 5: low threshold 400 (t <= 399 is the refinement stage)."""
    options = replace(_FULL, staged=StagedTargets(upper=599, lower=399))


class nnUNetTrainerUniSegDiff_high700(nnUNetTrainerUniSegDiff):
    """Table 5: high threshold 700 (t > 699 is the rapid stage)."""
    options = replace(_FULL, staged=StagedTargets(upper=699, lower=299))


class nnUNetTrainerUniSegDiff_noCheckpointing(nnUNetTrainerUniSegDiff):
    """Keeps the decoders' activations on every device (faster backward, more memory: benchmarks/memory_*)."""
    activation_checkpointing = "never"


class nnUNetTrainerUniSegDiff_epsLastJump(nnUNetTrainerUniSegDiff):
    """Staged inference whose last jump (X_299 -> mask, 10 draws per branch) goes through the eps head, as Sec. 2.2
    says ("sampled ten times by the noise prediction branch"), instead of the default's x0 head; training unchanged.
    Measured worse at equal time (docs/methods/unisegdiff.md)."""
    options = replace(_FULL, last_jump_head="eps")


class nnUNetTrainerUniSegDiff_dcaMaxTokens1024(nnUNetTrainerUniSegDiff):
    """DCA also at stages of up to 1024 voxels (the default before 2026-12-05; on the example's 2d plan the 20 x 20
    stage too): slower per iteration and per case (benchmarks/results_cpu_cost_levers.md)."""
    options = replace(_FULL, dca_max_tokens=1024)
