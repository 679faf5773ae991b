"""nnU-Net's Residual Encoder presets (``-pl nnUNetPlannerResEncM``: network ResidualEncoderUNet, n_blocks_per_stage):
every method builds its plans-shaped encoders with nnU-Net's residual blocks, trains and samples on them; UniSegDiff's
CFENet is nnU-Net's ResidualEncoderUNet and loads a stock ResEnc checkpoint; a model trained on ResEnc plans before
they were built (no ``encoder_blocks`` in its block) rebuilds plain, as it was trained."""
import copy

import pytest
import torch
from conftest import make_configuration
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from test_half_precision import C, build, mostly_background, train_and_sample

from nnunet_diffusion.architectures.conditional_unet import plans_encoder
from nnunet_diffusion.trainers.common.data_checks import ENCODER_BLOCKS_KEY
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling
from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff

pytestmark = pytest.mark.usefixtures("one_thread")
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# the main trainers (their variants change options, not how the plans' encoders are built); DSM below
MAIN_DIFFUSION_TRAINERS = [nnUNetTrainerDiffusion, nnUNetTrainerDiffSegRecycling, nnUNetTrainerCrossTimestep,
                           nnUNetTrainerUniSegDiff, nnUNetTrainerTextDiffSeg]
DSM_BLOCK = {"stage": 1, "organ_classes": [0, 1, 2], "tumour_classes": [], "query_dim": 16, "max_kmmm_layers": 2,
             "kmeans": True, "backbone": "unet", "anomaly": "organ_queries", "text": {"dim": 8}}


def resenc_configuration(dim, features=(4, 8), patch=None, trainer_cls=None, built_residual=True) -> dict:
    """A ResEnc plan as nnU-Net's ResEnc planners write it, with the block ``trainer_cls`` stores at training
    (``encoder_blocks: residual`` unless ``built_residual`` is False: a model from before)."""
    config = make_configuration(dim, features=features, patch=patch)
    architecture = config["architecture"]
    architecture["network_class_name"] = RESENC
    architecture["arch_kwargs"]["n_blocks_per_stage"] = architecture["arch_kwargs"].pop("n_conv_per_stage")
    if trainer_cls is nnUNetTrainerDSM:
        config["dsm"] = copy.deepcopy(DSM_BLOCK)
    elif trainer_cls is not None:
        config["diffusion"].update(copy.deepcopy(trainer_cls.diffusion_settings()))
    if built_residual and trainer_cls is not None:
        config[trainer_cls.settings_key][ENCODER_BLOCKS_KEY] = "residual"
    return config


def residual_blocks(network) -> int:
    return sum(isinstance(m, BasicBlockD) for m in network.modules())


def test_the_residual_plans_encoder_is_nnunets_residual_encoder_with_the_stem_in_stage_0():
    """Same function as nnU-Net's ResidualEncoder (stem, then stages) with the stem run inside stage 0."""
    from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
    kwargs = ConfigurationManager(resenc_configuration(2, features=(4, 8, 16))).network_arch_init_kwargs
    encoder_kwargs = nnUNetTrainerDiffusionBase.plans_unet_kwargs(ConfigurationManager(
        resenc_configuration(2, features=(4, 8, 16), trainer_cls=nnUNetTrainerDiffusionBase)))
    encoder_kwargs.pop("n_conv_per_stage_decoder")
    torch.manual_seed(0)
    ours = plans_encoder(1, **encoder_kwargs)
    stock = ResidualEncoder(1, **encoder_kwargs, return_skips=True)
    assert kwargs["n_blocks_per_stage"] == [1, 1, 1] and ours.stem is None and len(ours.stages) == 3
    stock.stem.load_state_dict(ours.stages[0][0].state_dict())
    stock.stages[0].load_state_dict(ours.stages[0][1].state_dict())
    for s in (1, 2):
        stock.stages[s].load_state_dict(ours.stages[s].state_dict())
    x = torch.randn(2, 1, 16, 16)
    for a, b in zip(ours.eval()(x), stock.eval()(x)):
        torch.testing.assert_close(a, b)
    assert residual_blocks(ours) == 3


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("trainer_cls", MAIN_DIFFUSION_TRAINERS, ids=lambda cls: cls.__name__)
def test_every_diffusion_trainer_builds_trains_and_samples_with_residual_blocks(trainer_cls, dim):
    plain = build(trainer_cls, lambda d, **k: ConfigurationManager(make_configuration(d, **k)), dim)
    net = build(trainer_cls, lambda d, **k: ConfigurationManager(resenc_configuration(d, trainer_cls=trainer_cls, **k)),
                dim)
    # more residual blocks than on the plain plans (TextDiffSeg's label autoencoder has its own: not plans-shaped)
    assert residual_blocks(net) > residual_blocks(plain)
    shape = (8,) * dim
    output, loss, grad, probabilities = train_and_sample(net, torch.randn(1, 1, *shape), mostly_background(shape),
                                                         torch.float32)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # every trainable residual block learns (frozen ones: UniSegDiff's pre-trained CFENet)
    for block in (m for m in net.modules() if isinstance(m, BasicBlockD)):
        weights = [p for p in block.parameters() if p.requires_grad]
        assert not weights or any(p.grad is not None and p.grad.abs().sum() > 0 for p in weights), trainer_cls
    torch.testing.assert_close(probabilities.sum(1), torch.ones_like(probabilities[:, 0]))


@pytest.mark.parametrize("dim", [2, 3])
def test_dsm_backbone_is_residual_and_trains(dim):
    net = nnUNetTrainerDSM.build_network_architecture(
        None, ConfigurationManager(resenc_configuration(dim, trainer_cls=nnUNetTrainerDSM)), 1, C, False)
    assert residual_blocks(net) > 0
    out = net.train()(torch.randn(2, 1, *(16,) * dim), full=True)
    out.logits.float().square().mean().backward()
    blocks = [m for m in net.modules() if isinstance(m, BasicBlockD)]
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in blocks)


def test_unisegdiff_condition_network_is_nnunets_resenc_unet_and_loads_a_stock_resenc_checkpoint():
    """The frozen CFENet of a ResEnc plan is nnU-Net's own ResidualEncoderUNet: the stock trainer's network of that
    plan (built by nnU-Net, with deep supervision as it trains) loads into it strictly."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    config = resenc_configuration(3, features=(4, 8), trainer_cls=nnUNetTrainerUniSegDiff)
    manager = ConfigurationManager(config)
    net = nnUNetTrainerUniSegDiff.build_network_architecture(None, manager, 1, C, False)
    cfenet = net.denoiser.cfenet
    assert type(cfenet).__name__ == "ResidualEncoderUNet" and residual_blocks(cfenet) > 0
    torch.manual_seed(3)
    stock = get_network_from_plans(manager.network_arch_class_name, manager.network_arch_init_kwargs,
                                   manager.network_arch_init_kwargs_req_import, 1, C, deep_supervision=True)
    cfenet.load_state_dict(stock.state_dict())
    image = torch.randn(1, 1, 8, 8, 8)
    stock.decoder.deep_supervision = False
    torch.testing.assert_close(cfenet.eval()(image), stock.eval()(image))
    assert not any(p.requires_grad for p in cfenet.parameters())


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerCrossTimestep, nnUNetTrainerDSM], ids=lambda cls: cls.__name__)
def test_a_model_trained_on_resenc_plans_before_they_were_built_rebuilds_plain(trainer_cls):
    config = resenc_configuration(2, trainer_cls=trainer_cls, built_residual=False)
    net = trainer_cls.build_network_architecture(None, ConfigurationManager(config), 1, C, False)
    assert residual_blocks(net) == 0 and any(isinstance(m, StackedConvBlocks) for m in net.modules())


# recycling: the plans' residual encoder and decoder alone (the other methods add the same blocks; their own parts are
# checked on large patches in test_half_precision.py)
@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerDiffSegRecycling], ids=lambda cls: cls.__name__)
def test_residual_blocks_stay_finite_in_half_precision_on_a_patch_larger_than_float16_counts(trainer_cls):
    """float16 and bfloat16 autocast on a 2d patch of 264 x 264 = 69696 voxels (> 65504): the residual additions
    and norms of ResEnc's blocks stay finite in training (loss, gradients) and sampling."""
    net = build(trainer_cls, lambda d, **k: ConfigurationManager(resenc_configuration(d, trainer_cls=trainer_cls, **k)),
                2, patch=[264, 264])
    shape = (264, 264)
    for dtype in (torch.float16, torch.bfloat16):
        output, loss, grad, probabilities = train_and_sample(net, torch.randn(1, 1, *shape),
                                                             mostly_background(shape), dtype)
        for value in (output, loss, grad, probabilities):
            assert torch.isfinite(value).all(), dtype
