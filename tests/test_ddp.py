"""Multi-GPU training: every trainer's network trains under DistributedDataParallel as nnU-Net wraps it.

nnU-Net (``-num_gpus``) wraps the network in DDP with find_unused_parameters=False: a parameter that requires
grad but gets no gradient in a step fails the next iteration ("Expected to have finished reduction in the prior
iteration"). Two CPU processes with the gloo backend stand in for two GPUs. Trainers are discovered from nnU-Net's
entry point (``nnunet_ext/nnunet_diffusion_trainers.py``), so a trainer added there is tested here too.
"""
import datetime
import os
import socket
from types import SimpleNamespace

import pytest
from conftest import diffusion_trainers
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunet_diffusion.architectures import conditional_unet
from nnunet_diffusion.architectures.cross_timestep import apds
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3                      # classes incl. background
FEATURES = (4, 8, 16)      # three stages: the decoders have a deep-supervision head that must not exist
PATCH = (8, 8, 8)
WORLD_SIZE, STEPS = 2, 3




def build(trainer_cls, configuration: dict) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights wherever it is built
    return trainer_cls.build_network_architecture(None, ConfigurationManager(configuration), 1, C, False)


def nnunet_loss(ddp: bool) -> SimpleNamespace:
    """A stand-in for the trainer in ``diffusion_loss``: nnU-Net's Dice + CE as its _build_loss makes it (with
    ``ddp``, the batch Dice all-gathers its statistics across ranks)."""
    return SimpleNamespace(loss=DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": ddp}, {}, weight_ce=1, weight_dice=1,
        ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss))


def training_loss(network: nn.Module, loss_owner, batch_size: int = 2) -> torch.Tensor:
    """One training draw on random data (image (B, 1, *PATCH), labels (B, 1, *PATCH)) with the trainers' own
    loss (``diffusion_loss``: MSE to the noise or Dice + CE on the logits, plus APDS's Dice + CE)."""
    labels = torch.randint(0, C, (batch_size, 1, *PATCH))
    result = network(torch.randn(batch_size, 1, *PATCH), labels_to_x0(labels, C))
    return nnUNetTrainerDiffusionBase.diffusion_loss(loss_owner, result, labels)




@pytest.fixture
def configuration(configuration_manager) -> dict:
    return configuration_manager(3, features=FEATURES).configuration


@pytest.mark.parametrize("trainer_cls", diffusion_trainers(), ids=lambda cls: cls.__name__)
def test_every_parameter_gets_a_gradient(trainer_cls, configuration):
    """The cause of DDP's failure, in one process: after one backward, no trainable parameter lacks a gradient."""
    net = build(trainer_cls, configuration).train()
    training_loss(net, nnunet_loss(ddp=False)).backward()
    assert [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_under_ddp(rank: int, port: int, configuration: dict, names: list, out_dir: str) -> None:
    """One rank: for every trainer, DDP-wrap the network, run STEPS SGD steps on this rank's own random data
    (own timesteps, noise and, for recurrent models, chain start: ranks are seeded differently, as nnU-Net's are)
    and save the parameters. One process group for all trainers keeps it to one spawn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        classes, loss_owner = {cls.__name__: cls for cls in diffusion_trainers()}, nnunet_loss(ddp=True)
        for name in names:
            net = build(classes[name], configuration).train()
            network = DistributedDataParallel(net)  # find_unused_parameters=False, as nnU-Net
            optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.9)
            torch.manual_seed(1 + rank)
            for step in range(STEPS):
                optimizer.zero_grad(set_to_none=True)
                try:
                    training_loss(network, loss_owner).backward()
                except RuntimeError as error:
                    raise RuntimeError(f"{name}, step {step}: {error}") from error
                optimizer.step()
            torch.save({k: v.detach() for k, v in net.named_parameters()}, os.path.join(out_dir, f"{name}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_trainer_trains_under_ddp_on_two_processes(configuration, tmp_path):
    classes = {cls.__name__: cls for cls in diffusion_trainers()}
    mp.spawn(_train_under_ddp, args=(_free_port(), configuration, list(classes), str(tmp_path)), nprocs=WORLD_SIZE)
    for name, trainer_cls in classes.items():
        ranks = [torch.load(tmp_path / f"{name}.{rank}.pt") for rank in range(WORLD_SIZE)]
        initial = dict(build(trainer_cls, configuration).named_parameters())
        assert any(not torch.equal(ranks[0][k], initial[k]) for k in initial), name  # it did train
        for key in ranks[0]:  # averaged gradients, same optimizer: bit-identical parameters on every rank
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: {key} differs across ranks"


def test_deep_supervision_heads_train_under_ddp_on_two_processes(configuration_manager, tmp_path):
    """With four stages the deep-supervision variant keeps a second head (three stages keep one): it trains too."""
    configuration = configuration_manager(3, features=(4, 8, 16, 16)).configuration
    configuration["architecture"]["arch_kwargs"]["strides"][-1] = [1, 1, 1]  # the 8^3 patch: lowest stage 2^3
    name = "nnUNetTrainerDiffSegRecycling_deepSupervision"
    net = build({cls.__name__: cls for cls in diffusion_trainers()}[name], configuration)
    assert sum(not isinstance(head, nn.Identity) for head in net.denoiser.decoder.seg_layers) == 2
    mp.spawn(_train_under_ddp, args=(_free_port(), configuration, [name], str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"{name}.{rank}.pt") for rank in range(WORLD_SIZE)]
    initial = dict(net.named_parameters())
    heads = [k for k in initial if ".seg_layers." in k]
    assert all(not torch.equal(ranks[0][k], initial[k]) for k in heads)  # every head trained
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs across ranks"


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerDiffusion, nnUNetTrainerCrossTimestep],
                         ids=lambda cls: cls.__name__)
def test_checkpoints_with_the_removed_seg_layers_still_load(trainer_cls, configuration, monkeypatch):
    """A state dict saved before the unused heads were removed (``<decoder>.seg_layers.<i>.*`` for every decoder
    stage) loads strictly, as nnU-Net's predictor loads it, and the network computes the same."""
    with monkeypatch.context() as patch:  # the network as it was: every head kept
        patch.setattr(conditional_unet, "keep_last_seg_layer", lambda decoder, count=1: decoder)
        patch.setattr(apds, "keep_last_seg_layer", lambda decoder, count=1: decoder)
        old = build(trainer_cls, configuration).eval()
    old_state = old.state_dict()
    obsolete = [k for k in old_state if ".seg_layers.0." in k]
    decoders = 2 if trainer_cls is nnUNetTrainerCrossTimestep else 1  # + the APDS prior decoder
    assert len(obsolete) == 2 * decoders  # weight and bias
    net = build(trainer_cls, configuration).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()  # other weights than ``old``'s until loaded
    net.load_state_dict(old_state)
    assert not set(net.state_dict()) & set(obsolete)
    image = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        torch.testing.assert_close(net(image), old(image), rtol=0, atol=0)


def _unisegdiff_pretraining_under_ddp(rank: int, port: int, configuration: dict, out_dir: str) -> None:
    """UniSegDiff's two phases as its trainer runs them under DDP: the whole network wrapped once (CFENet frozen
    at build, so that DDP never registers it); the CFENet pre-training phase through the trainer's own wrapper
    (``_part_for_pretraining``), then frozen again (``_end_pretraining``) and DNet steps through
    the first DDP."""
    from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        net = build(nnUNetTrainerUniSegDiff, configuration).train()
        network = DistributedDataParallel(net)
        trainer = SimpleNamespace(is_ddp=True, device=torch.device("cpu"), local_rank=rank, current_epoch=0,
                                  _pretraining_wrapper=None, pretrained_part=lambda: net.denoiser.cfenet,
                                  print_to_log_file=print, pretrained_part_name='CFENet',
                                  training_progress=lambda: 0.5)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
        loss_owner = nnunet_loss(ddp=True)
        torch.manual_seed(1 + rank)
        for step in range(2):  # phase 1: CFENet's segmentation loss through its own DDP
            optimizer.zero_grad(set_to_none=True)
            cfenet = nnUNetTrainerUniSegDiff._part_for_pretraining(trainer)
            labels = torch.randint(0, C, (2, 1, *PATCH))
            loss_owner.loss(cfenet(torch.randn(2, 1, *PATCH)), labels).backward()
            optimizer.step()
        nnUNetTrainerUniSegDiff._end_pretraining(trainer)
        assert net.denoiser.cfenet_frozen()
        for step in range(2):  # phase 2: DNet through the first DDP
            optimizer.zero_grad(set_to_none=True)
            training_loss(network, loss_owner).backward()
            optimizer.step()
        torch.save({k: v.detach() for k, v in net.named_parameters()}, os.path.join(out_dir, f"pretraining.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_unisegdiff_condition_pretraining_phase_under_ddp(configuration, tmp_path):
    from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff
    mp.spawn(_unisegdiff_pretraining_under_ddp, args=(_free_port(), configuration, str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"pretraining.{rank}.pt") for rank in range(WORLD_SIZE)]
    initial = dict(build(nnUNetTrainerUniSegDiff, configuration).named_parameters())
    for prefix in ("denoiser.cfenet.", "denoiser.decoders."):  # both phases trained
        assert any(not torch.equal(ranks[0][k], initial[k]) for k in initial if k.startswith(prefix)), prefix
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs across ranks"


def _dsm_under_ddp(rank: int, port: int, configuration: dict, out_dir: str) -> None:
    """DSM's stage-1 and stage-2 networks trained with the trainer's own loss (``dsm_loss``: partial-label Dice +
    BCE, deep-supervised kMMM responses, text-aligned query classes) under DDP, 3 steps each."""
    from nnunet_diffusion.architectures.dsm.network import DSMNetwork, DSMStage2Network
    from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        kwargs = nnUNetTrainerDiffusionBase.plans_unet_kwargs(ConfigurationManager(configuration))
        for stage in (1, 2):
            torch.manual_seed(0)
            net = DSMNetwork(1, C, [0, 1], text_dim=8, dim=16, **kwargs)
            if stage == 2:
                net = DSMStage2Network(net, [2], kwargs["conv_op"])
            owner = SimpleNamespace(
                stage=stage, response_loss_weight=0.5, class_loss_weight=0.1,
                configuration_manager=SimpleNamespace(configuration={"dsm": {"organ_classes": [0, 1],
                                                                             "tumour_classes": [2]}}),
                label_manager=SimpleNamespace(num_segmentation_heads=C),
                loss=DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": True},
                                     dice_class=MemoryEfficientSoftDiceLoss))
            owner.trained_classes = lambda owner=owner: nnUNetTrainerDSM.trained_classes(owner)
            network = DistributedDataParallel(net)
            optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.9)
            torch.manual_seed(1 + rank)
            for step in range(STEPS):
                optimizer.zero_grad(set_to_none=True)
                labels = torch.randint(0, C, (2, 1, *PATCH))
                nnUNetTrainerDSM.dsm_loss(owner, network(torch.randn(2, 1, *PATCH), full=True), labels).backward()
                optimizer.step()
            torch.save({k: v.detach() for k, v in net.named_parameters()}, os.path.join(out_dir, f"dsm{stage}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_dsm_stages_train_under_ddp_on_two_processes(configuration, tmp_path):
    mp.spawn(_dsm_under_ddp, args=(_free_port(), configuration, str(tmp_path)), nprocs=WORLD_SIZE)
    for stage in (1, 2):
        ranks = [torch.load(tmp_path / f"dsm{stage}.{rank}.pt") for rank in range(WORLD_SIZE)]
        assert ranks[0].keys() == ranks[1].keys()
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), f"stage {stage}: {key} differs across ranks"
