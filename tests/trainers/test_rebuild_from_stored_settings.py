"""A stored model rebuilds from its plans.json block only: editing the trainer class after training (another
default, a changed ablation) changes what a new training builds, never what a trained model rebuilds."""
import copy

import pytest
import torch
from conftest import TEXT_DIM, make_configuration
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_diffusion.architectures.cross_timestep.network import CrossTimestepOptions
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM
from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff

C = 3
DSM_BLOCK = {"stage": 1, "organ_classes": [0, 1, 2], "tumour_classes": [], "query_dim": 16, "max_kmmm_layers": 4,
             "kmeans": True, "backbone": "unet", "anomaly": "organ_queries", "text": {"dim": TEXT_DIM}}

# (trainer, the class attributes edited after training, what the stored block says)
CASES = [
    (nnUNetTrainerCrossTimestep, {"options": CrossTimestepOptions(sc=False, fft=False, apds=False)}, None),
    (nnUNetTrainerUniSegDiff, {"use_dca": False, "condition_network": "joint"}, None),
    (nnUNetTrainerTextDiffSeg, {"latent_channels": 2, "text_fusion": "concat", "image_branch": "downsample"}, None),
    (nnUNetTrainerDSM, {"query_dim": 32, "kmeans": False, "max_kmmm_layers": 1}, DSM_BLOCK),
]


def configuration(trainer_cls, dsm_block=None) -> ConfigurationManager:
    """A trained model's configuration: the plans' U-Net and the block the trainer stored (settings of today's
    class, as at training)."""
    config = make_configuration(2, features=(4, 8, 16), patch=[16, 16])
    if dsm_block is not None:
        config["dsm"] = copy.deepcopy(dsm_block)
    else:
        config["diffusion"].update(copy.deepcopy(trainer_cls.diffusion_settings()))
    return ConfigurationManager(config)


def architecture(network) -> dict:
    """Parameter and buffer names with their shapes, and the module types: what a checkpoint must fit."""
    return {"tensors": {k: tuple(v.shape) for k, v in network.state_dict().items()},
            "modules": [type(m).__name__ for m in network.modules()]}


@pytest.mark.parametrize("trainer_cls, edits, dsm_block", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_editing_the_class_after_training_does_not_change_what_a_stored_model_rebuilds(trainer_cls, edits, dsm_block,
                                                                                       monkeypatch):
    trained = configuration(trainer_cls, dsm_block)
    before = architecture(trainer_cls.build_network_architecture(None, trained, 1, C, False))
    for name, value in edits.items():
        monkeypatch.setattr(trainer_cls, name, value)
    rebuilt = trainer_cls.build_network_architecture(None, trained, 1, C, False)
    assert architecture(rebuilt) == before
    # the edits are real: a model trained with the edited class (its own block) is another network
    edited_block = dict(dsm_block, **edits) if dsm_block is not None else None
    fresh = trainer_cls.build_network_architecture(None, configuration(trainer_cls, edited_block), 1, C, False)
    assert architecture(fresh) != before
