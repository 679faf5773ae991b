"""A stored model rebuilds from its plans.json block only: editing the trainer class after training (another
default, a changed ablation) changes what a new training builds, never what a trained model rebuilds."""
import copy
import json
from dataclasses import replace

import pytest
from conftest import TEXT_DIM, make_configuration
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_diffusion.architectures.cross_timestep.network import CrossTimestepOptions
from nnunet_diffusion.architectures.dsm.options import DSMOptions
from nnunet_diffusion.architectures.options import StoredOptions
from nnunet_diffusion.architectures.textdiffseg.options import TextDiffSegOptions
from nnunet_diffusion.architectures.unisegdiff.options import UniSegDiffOptions
from nnunet_diffusion.diffusion.staged import StagedTargets
from nnunet_diffusion.trainers.cross_timestep import variants as variants_cross_timestep
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling
from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff

C = 3
DSM_BLOCK = {"stage": 1, "organ_classes": [0, 1, 2], "tumour_classes": [], "query_dim": 16, "max_kmmm_layers": 4,
             "kmeans": True, "backbone": "unet", "anomaly": "organ_queries", "text": {"dim": TEXT_DIM}}

# (trainer, the class attributes edited after training, what the stored block says)
CASES = [
    (nnUNetTrainerCrossTimestep, {"options": replace(nnUNetTrainerCrossTimestep.options, sc=False, fft=False,
                                                     apds=False)}, None),
    (nnUNetTrainerUniSegDiff, {"options": replace(nnUNetTrainerUniSegDiff.options, dca=False,
                                                  condition_network="joint")}, None),
    (nnUNetTrainerTextDiffSeg, {"options": replace(nnUNetTrainerTextDiffSeg.options, latent_channels=2,
                                                   text_fusion="concat", image_branch="downsample")}, None),
    (nnUNetTrainerDSM, {"options": replace(nnUNetTrainerDSM.options, query_dim=32, kmeans=False, max_kmmm_layers=1)},
     DSM_BLOCK),
    # recycling's settings are the shared diffusion block's: the parametrisation and the recycling of x0
    (nnUNetTrainerDiffSegRecycling, {"prediction": "eps", "recycling": False, "clip_noisy_input": False}, None),
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
            "modules": [type(m).__name__ for m in network.modules()],
            "segmenter": {k: getattr(network, k, None) for k in ("prediction", "recycling", "clip_noisy_input")}}


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
    edited_block = dict(dsm_block, **edits["options"].to_stored()) if dsm_block is not None else None
    fresh = trainer_cls.build_network_architecture(None, configuration(trainer_cls, edited_block), 1, C, False)
    assert architecture(fresh) != before


@pytest.mark.parametrize("variant", variants_cross_timestep.__all__)
def test_every_cross_timestep_ablation_rebuilds_its_own_network_from_its_stored_block(variant):
    """What nnUNetv2_predict does with an ablation's model (its class by name, build_network_architecture from the
    block its training stored) gives the ablation's network; the stored block alone decides it (the base class
    rebuilds the same). One CLI run (test_end_to_end) covers the path; this covers every ablation's options."""
    cls = getattr(variants_cross_timestep, variant)
    stored = configuration(cls)
    network = cls.build_network_architecture(None, stored, 1, C, False)
    assert network.denoiser.options == cls.options and network.prediction == cls.prediction
    assert architecture(nnUNetTrainerCrossTimestep.build_network_architecture(None, stored, 1, C, False)) == \
        architecture(network)
    if cls.options != nnUNetTrainerCrossTimestep.options:
        default = nnUNetTrainerCrossTimestep.build_network_architecture(
            None, configuration(nnUNetTrainerCrossTimestep), 1, C, False)
        assert default.denoiser.options != network.denoiser.options


def every_trainer_with_options():
    from nnunet_diffusion.nnunet_ext import nnunet_diffusion_trainers as exported
    return sorted((name, cls) for name, cls in vars(exported).items()
                  if isinstance(cls, type) and isinstance(getattr(cls, "options", None), StoredOptions))


@pytest.mark.parametrize("name, trainer_cls", every_trainer_with_options(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_trainers_options_survive_plans_json(name, trainer_cls):
    """What the trainer stores (JSON, as plans.json holds it) rebuilds the same frozen options."""
    stored = json.loads(json.dumps(trainer_cls.options.to_stored()))
    assert type(trainer_cls.options).from_stored(stored) == trainer_cls.options


def test_a_block_from_before_a_setting_existed_rebuilds_what_that_model_was_trained_with():
    """Fields added after models were trained take those models' values, not today's defaults."""
    tds = TextDiffSegOptions.from_stored({k: v for k, v in TextDiffSegOptions().to_stored().items()
                                          if k != "segmentation_loss"})
    assert tds.segmentation_loss == "reconstruction" and TextDiffSegOptions().segmentation_loss != "reconstruction"
    usd = UniSegDiffOptions.from_stored({"staged": {"upper": 699, "lower": 199, "ratios": [[1, 3], [1, 1], [3, 1]]},
                                         "heads": ["eps", "x0"], "dca": False, "condition_network": "joint"})
    assert usd == UniSegDiffOptions(staged=StagedTargets(699, 199), heads=("eps", "x0"), dca=False,
                                    condition_network="joint", last_jump_head="eps", dca_max_tokens=1024)
    assert UniSegDiffOptions().dca_max_tokens == 256
    assert UniSegDiffOptions.from_stored({**UniSegDiffOptions().to_stored(), "staged": None}).staged is None
    ct = CrossTimestepOptions.from_stored({"apds": True})  # before the residual RA default and the identity start
    assert (ct.ra, ct.identity_start) == ("reverse_attention", False)
    assert (CrossTimestepOptions().ra, CrossTimestepOptions().identity_start) == ("residual_reverse_attention", True)
    # DSM before 'text_alignment' was stored: a model without class text had none
    assert DSMOptions.from_stored({"query_dim": 16, "text": None}) == DSMOptions(query_dim=16, text_alignment=False,
                                                                                 ssm_state=16, min_output_stride=1)
    assert DSMOptions.from_stored({"query_dim": 16, "text": {"dim": 8}}).text_alignment is True
    # DSM before 'ssm_state' was stored: Mamba's default state size 16 (today's default: 4)
    assert DSMOptions.from_stored({"query_dim": 16}).ssm_state == 16 and DSMOptions().ssm_state == 4
    # and before 'min_output_stride': kMMM layers down to the finest decoder scale (today's default: the paper's 4)
    assert DSMOptions.from_stored({"query_dim": 16}).min_output_stride == 1 and DSMOptions().min_output_stride == 4
