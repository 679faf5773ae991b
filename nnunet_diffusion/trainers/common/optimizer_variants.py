"""Optimiser variants: each diffusion trainer with the optimiser it does not use by default.

The defaults were chosen by measurement (benchmarks/optimizers/): AdamW (lr 1e-3, weight decay 1e-2, nnU-Net's
poly decay) learned as well as or better than nnU-Net's SGD (Nesterov, momentum 0.99, lr 1e-2) for every
diffusion trainer at an equal budget. Each variant here changes only the optimiser back to nnU-Net's SGD.
"""
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling

__all__ = ["nnUNetTrainerDiffusion_SGD", "nnUNetTrainerDiffSegRecycling_SGD", "nnUNetTrainerCrossTimestep_SGD"]


class _SGD:
    """nnU-Net's optimiser: SGD, Nesterov, momentum 0.99, lr 1e-2, poly decay."""
    optimizer_kind = "sgd"
    learning_rate = None


class nnUNetTrainerDiffusion_SGD(_SGD, nnUNetTrainerDiffusion):
    pass


class nnUNetTrainerDiffSegRecycling_SGD(_SGD, nnUNetTrainerDiffSegRecycling):
    pass


class nnUNetTrainerCrossTimestep_SGD(_SGD, nnUNetTrainerCrossTimestep):
    pass
