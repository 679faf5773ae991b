"""Sampler settings: training runs on what the model stores; NNUNET_DIFFUSION_{SAMPLER,STEPS,SAMPLES,SEED} apply to
the final validation and to prediction only, and samplers visiting timesteps the model never trained on are refused
with the valid choices."""
import glob
import os

import pytest
import torch
from conftest import make_configuration
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as stock_module
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff

LABELS = {"background": 0, "organ": 1}
SAMPLER_VARIABLES = ("NNUNET_DIFFUSION_SAMPLER", "NNUNET_DIFFUSION_STEPS", "NNUNET_DIFFUSION_SAMPLES",
                     "NNUNET_DIFFUSION_SEED")


@pytest.fixture(autouse=True)
def no_sampler_env(monkeypatch):
    for name in SAMPLER_VARIABLES + ("NNUNET_DIFFUSION_CHAIN_STEPS", "NNUNET_DIFFUSION_UNROLL_STEPS"):
        monkeypatch.delenv(name, raising=False)


def make(trainer_cls, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    config = make_configuration(3, extra={"batch_size": 2, "batch_dice": False})
    plans = {"label_manager": "LabelManager", "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": config}, "continue_training": False}
    return trainer_cls(plans, "3d_fullres", 0, {"labels": LABELS, "channel_names": {"0": "MRI"}},
                       device=torch.device("cpu"))


def initialize(trainer, monkeypatch):
    """nnU-Net's initialize (which builds the network through build_network_architecture), minus the dataset."""
    monkeypatch.setattr(stock_module, "infer_dataset_class", lambda folder: None)
    trainer.initialize()
    return trainer.network


def final_validation_sampler(trainer, monkeypatch) -> SamplerSettings:
    """The sampler the network carries inside the final validation (nnU-Net's own part replaced by a probe)."""
    seen = []
    monkeypatch.setattr(stock_module.nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: seen.append(self.network.sampler))
    trainer.perform_actual_validation()
    return seen[0]


def log_text(trainer) -> str:
    return "".join(open(f).read() for f in glob.glob(os.path.join(trainer.output_folder, "training_log_*.txt")))


def test_env_at_training_changes_neither_training_nor_stored_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", "4")
    monkeypatch.setenv("NNUNET_DIFFUSION_SEED", "7")
    trainer = make(nnUNetTrainerDiffusion, tmp_path, monkeypatch)
    stored = trainer.configuration_manager.configuration["diffusion"]
    assert stored["sampler"] == nnUNetTrainerDiffusion.default_sampler.to_dict()      # plans.json: the trainer's
    assert "NNUNET_DIFFUSION_STEPS=4, NNUNET_DIFFUSION_SEED=7: sampler settings apply to the final validation and " \
           "to prediction only, not to training" in log_text(trainer)
    network = initialize(trainer, monkeypatch)
    assert network.sampler == nnUNetTrainerDiffusion.default_sampler                   # training network: stored
    assert final_validation_sampler(trainer, monkeypatch) == SamplerSettings("ddim", 4, 1, 7)   # like predict
    assert network.sampler == nnUNetTrainerDiffusion.default_sampler                   # and back afterwards


def test_env_at_training_does_not_change_the_cross_timestep_training_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_SAMPLER", "ddpm")
    monkeypatch.setenv("NNUNET_DIFFUSION_SAMPLES", "2")
    trainer = make(nnUNetTrainerCrossTimestep, tmp_path, monkeypatch)
    stored = trainer.configuration_manager.configuration["diffusion"]
    assert stored["training_chain"] == {"kind": "ddim", "steps": 10}
    assert stored["sampler"] == {"kind": "ddim", "steps": 10, "num_samples": 1, "seed": 0, "fusion": "mean"}
    network = initialize(trainer, monkeypatch)
    assert network.training_chain == SamplerSettings("ddim", 10)
    assert network.chain_schedule.timesteps.tolist() == list(range(0, 1000, 111))
    assert network.sampler == SamplerSettings("ddim", 10)
    assert final_validation_sampler(trainer, monkeypatch) == SamplerSettings("ddpm", 10, 2, 0)
    assert network.training_chain == SamplerSettings("ddim", 10)


def test_untrained_steps_at_training_are_refused_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", "4")
    with pytest.raises(ValueError, match=r"10-step chain.*Valid NNUNET_DIFFUSION_STEPS for this model: \[10\].*"
                                         r"NNUNET_DIFFUSION_STEPS apply to the final validation and to prediction, "
                                         r"not to training"):
        make(nnUNetTrainerCrossTimestep, tmp_path, monkeypatch)
    assert list(tmp_path.iterdir()) == []


def build_for_prediction(trainer_cls, stored=None, merge=True):
    """What nnUNetv2_predict does: build_network_architecture from the model's plans (stored settings)."""
    extra = None if stored is None else {"diffusion": {**trainer_cls.diffusion_settings(), **stored} if merge
                                         else stored}
    configuration = ConfigurationManager(make_configuration(3, extra=extra))
    return trainer_cls.build_network_architecture(None, configuration, 1, 2, False)


def test_env_at_prediction_changes_the_sampler(monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", "4")
    monkeypatch.setenv("NNUNET_DIFFUSION_SAMPLER", "ddpm")
    assert build_for_prediction(nnUNetTrainerDiffusion).sampler == SamplerSettings("ddpm", 4)
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", "3")
    assert build_for_prediction(nnUNetTrainerDiffSegRecycling).sampler == SamplerSettings("ddpm", 3)
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", "10")
    network = build_for_prediction(nnUNetTrainerCrossTimestep)
    assert network.sampler == SamplerSettings("ddpm", 10) and network.training_chain == SamplerSettings("ddim", 10)


CHAIN_4 = {"training_chain": {"kind": "ddim", "steps": 4},
           "sampler": {"kind": "ddim", "steps": 4, "num_samples": 1, "seed": 0}}


@pytest.mark.parametrize("trainer_cls,stored,steps,valid", [
    (nnUNetTrainerCrossTimestep, None, "4", r"\[10\]"),
    (nnUNetTrainerCrossTimestep, CHAIN_4, "10", r"\[4\]"),
    (nnUNetTrainerDiffSegRecycling, None, "1", r"\[2, 3, 5\]"),
])
def test_untrained_timesteps_are_refused_at_prediction_with_the_choices(trainer_cls, stored, steps, valid,
                                                                      monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", steps)
    with pytest.raises(ValueError, match=f"cannot sample with {steps} steps.*"
                                         f"Valid NNUNET_DIFFUSION_STEPS for this model: {valid}"):
        build_for_prediction(trainer_cls, stored)


def test_stored_training_chain_is_what_prediction_checks(monkeypatch):
    network = build_for_prediction(nnUNetTrainerCrossTimestep, CHAIN_4)
    assert network.training_chain == SamplerSettings("ddim", 4) and network.sampler.steps == 4
    # plans.json written before the training chain was stored: the class default (what those models trained on)
    legacy = {key: value for key, value in nnUNetTrainerCrossTimestep.diffusion_settings().items()
              if key not in ("training_chain", "chain_gradient")}
    network = build_for_prediction(nnUNetTrainerCrossTimestep, legacy, merge=False)
    assert network.training_chain == SamplerSettings("ddim", 10)


def test_chain_steps_variable_sets_and_stores_the_training_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_CHAIN_STEPS", "4")
    trainer = make(nnUNetTrainerCrossTimestep, tmp_path, monkeypatch)
    stored = trainer.configuration_manager.configuration["diffusion"]
    assert stored["training_chain"] == {"kind": "ddim", "steps": 4} and stored["sampler"]["steps"] == 4
    network = initialize(trainer, monkeypatch)
    assert network.chain_schedule.timesteps.tolist() == [0, 333, 666, 999] and network.sampler.steps == 4
    # at prediction the variable means nothing: the stored chain counts (here: legacy plans -> class default)
    legacy = {key: value for key, value in nnUNetTrainerCrossTimestep.diffusion_settings().items()
              if key not in ("training_chain", "chain_gradient")}
    assert build_for_prediction(nnUNetTrainerCrossTimestep, legacy, merge=False).training_chain.steps == 10
    monkeypatch.setenv("NNUNET_DIFFUSION_CHAIN_STEPS", "7")
    with pytest.raises(ValueError, match="NNUNET_DIFFUSION_CHAIN_STEPS=7: Cannot respace a 1000-step schedule"):
        make(nnUNetTrainerCrossTimestep, tmp_path / "other", monkeypatch)
    assert not (tmp_path / "other").exists()


def test_x0_model_without_recycling_trains_the_step_its_sampler_starts_at():
    """Recycling trains t in 0..T-2 (T-1 is its no-gradient pass); without recycling nothing else would ever train
    t = T-1, where the sampler starts from pure noise, so training draws t over all T steps."""
    from nnunet_diffusion.diffusion.masks import labels_to_x0
    from nnunet_diffusion.trainers.recycling.variants import nnUNetTrainerDiffSegRecycling_noRecycling
    network = build_for_prediction(nnUNetTrainerDiffSegRecycling_noRecycling).train()
    seen = set()
    network.denoiser.register_forward_hook(lambda m, i, o: seen.update(i[1].tolist()))
    torch.manual_seed(0)
    network(torch.randn(32, 1, 8, 8, 8), labels_to_x0(torch.randint(0, 2, (32, 1, 8, 8, 8)), 2))
    assert seen == {0, 250, 500, 750, 1000}
    assert network.training_coverage().trained == (0, 250, 500, 750, 1000)


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerCrossTimestep, nnUNetTrainerUniSegDiff])
@pytest.mark.parametrize("policy, device, expected", [("", "cpu", False), ("", "cuda", True), ("always", "cpu", True),
                                                      ("never", "cuda", False), ("cuda", "cpu", False)])
def test_activation_checkpointing_follows_the_device_and_the_variable(trainer_cls, policy, device, expected,
                                                                      tmp_path, monkeypatch):
    """The default ('cuda') checkpoints where nnU-Net's memory plan applies (a GPU), not on the CPU; the variable
    overrides it; every checkpointed block of the network is set, and the log says which."""
    if policy:
        monkeypatch.setenv("NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING", policy)
    else:
        monkeypatch.delenv("NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING", raising=False)
    monkeypatch.setenv("NNUNET_DIFFUSION_CONDITION_CHECKPOINT", "")  # UniSegDiff: no stock model to look for
    trainer = make(trainer_cls, tmp_path, monkeypatch)
    trainer.device = torch.device(device)  # what the policy reads (no GPU here: the network stays on the CPU)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    network = initialize(trainer, monkeypatch)
    flags = [m.checkpoint_activations for m in network.modules() if hasattr(m, "checkpoint_activations")]
    assert flags and all(flag is expected for flag in flags)
    assert f"Activation checkpointing {'on' if expected else 'off'}" in log_text(trainer)
    if trainer_cls is nnUNetTrainerCrossTimestep:  # only the finest levels' stages (CrossTimestepDenoiser)
        assert network.denoiser.checkpoint_levels == 2
        assert ("the 2 finest resolution levels only" in log_text(trainer)) is expected


def test_bad_activation_checkpointing_variable_is_refused_at_trainer_start(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING", "sometimes")
    with pytest.raises(ValueError, match=r"NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING='sometimes': must be one of"):
        make(nnUNetTrainerCrossTimestep, tmp_path, monkeypatch)
    assert list(tmp_path.iterdir()) == []
