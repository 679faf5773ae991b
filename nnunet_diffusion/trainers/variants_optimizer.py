"""Optimiser variants of every diffusion trainer (the comparison in benchmarks/optimizers/).

nnU-Net trains with SGD (Nesterov, momentum 0.99, lr 1e-2, poly decay); diffusion denoisers are usually trained
with AdamW around 1e-4 (Diff-UNet, MedSegDiff, ImgX-DiffSeg). Each variant changes only the optimiser.
"""
from nnunet_diffusion.trainers.cross_timestep import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.recycling import nnUNetTrainerDiffSegRecycling

__all__ = ["nnUNetTrainerDiffusion_AdamW", "nnUNetTrainerDiffSegRecycling_AdamW", "nnUNetTrainerCrossTimestep_AdamW"]


class _AdamW:
    """AdamW, lr 1e-3, weight decay 1e-2, nnU-Net's poly decay."""
    optimizer_kind = "adamw"
    learning_rate = 1e-3


class nnUNetTrainerDiffusion_AdamW(_AdamW, nnUNetTrainerDiffusion):
    pass


class nnUNetTrainerDiffSegRecycling_AdamW(_AdamW, nnUNetTrainerDiffSegRecycling):
    pass


class nnUNetTrainerCrossTimestep_AdamW(_AdamW, nnUNetTrainerCrossTimestep):
    pass
