"""Entry point for nnU-Net's trainer search (env var nnUNet_extTrainer points at this folder).

nnU-Net imports every module of that folder as a flat top-level module, so this file holds only absolute
re-exports of trainers that live in the real package. Add new trainers here.
"""
try:
    from nnunet_diffusion.trainers.common.budget import (nnUNetTrainerBudget, nnUNetTrainerBudgetAdam1en3,  # noqa: F401
                                                         nnUNetTrainerBudgetAdam1en3NoDeepSupervision)
    from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion  # noqa: F401
    from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling  # noqa: F401
    from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep  # noqa: F401
    from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff  # noqa: F401
    from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg  # noqa: F401
    from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM, nnUNetTrainerDSMStage2  # noqa: F401
    from nnunet_diffusion.trainers.diffusion.variants import *  # noqa: F401,F403
    from nnunet_diffusion.trainers.recycling.variants import *  # noqa: F401,F403
    from nnunet_diffusion.trainers.unisegdiff.variants import *  # noqa: F401,F403
    from nnunet_diffusion.trainers.textdiffseg.variants import *  # noqa: F401,F403
    from nnunet_diffusion.trainers.dsm.variants import *  # noqa: F401,F403
    from nnunet_diffusion.trainers.cross_timestep.variants import *  # noqa: F401,F403
    from nnunet_diffusion.trainers.common.optimizer_variants import *  # noqa: F401,F403
except ImportError as error:  # the env var outlived the environment the package was installed in
    raise ImportError(
        f"nnUNet_extTrainer points at nnunet-diffusion's trainer folder, but the package cannot be imported in "
        f"this Python environment ({error}). Activate the environment where nnunet-diffusion is installed, or "
        f"unset nnUNet_extTrainer.") from error
