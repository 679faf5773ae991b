"""Trainer-start checks: refused datasets and settings fail before any folder is made."""
import pytest
from conftest import make_configuration

from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling

PLANS = {"label_manager": "LabelManager", "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
         "configurations": {"3d_fullres": make_configuration(3)}}


def make(trainer_cls, labels, tmp_path, monkeypatch, **dataset):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    return trainer_cls(dict(PLANS, continue_training=False), "3d_fullres", 0, {"labels": labels, **dataset},
                       device=__import__("torch").device("cpu"))


def test_unknown_sampler_is_refused_at_trainer_start(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_SAMPLER", "euler")
    with pytest.raises(ValueError, match="Unknown sampler 'euler'. Choose one of \\['ddpm', 'ddim', 'staged'\\]"):
        make(nnUNetTrainerDiffusion, {"background": 0, "organ": 1}, tmp_path, monkeypatch)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,value,message", [("NNUNET_DIFFUSION_EPOCHS", "ten", "must be a number"),
                                                 ("NNUNET_DIFFUSION_TIME_BUDGET", "-5", "must be > 0")])
def test_bad_run_length_variables_are_refused(name, value, message, tmp_path, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}='{value}' {message}"):
        make(nnUNetTrainerDiffusion, {"background": 0, "organ": 1}, tmp_path, monkeypatch)
    assert list(tmp_path.iterdir()) == []


def test_run_length_variables_set_the_schedule(tmp_path, monkeypatch):
    for name, value in [("NNUNET_DIFFUSION_EPOCHS", "3"), ("NNUNET_DIFFUSION_ITERATIONS", "7"),
                        ("NNUNET_DIFFUSION_VAL_ITERATIONS", "2"), ("NNUNET_DIFFUSION_TIME_BUDGET", "90")]:
        monkeypatch.setenv(name, value)
    trainer = make(nnUNetTrainerDiffusion, {"background": 0, "organ": 1}, tmp_path, monkeypatch)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
            trainer.time_budget_s, trainer.save_every) == (3, 7, 2, 90.0, 1)


def test_unroll_steps_setting_reaches_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_UNROLL_STEPS", "3")
    trainer = make(nnUNetTrainerCrossTimestep, {"background": 0, "organ": 1}, tmp_path, monkeypatch)
    assert trainer.configuration_manager.configuration["diffusion"]["unroll_steps"] == 3
    network = nnUNetTrainerCrossTimestep.build_network_architecture(None, trainer.configuration_manager, 1, 2)
    assert network.unroll_steps == 3
    monkeypatch.setenv("NNUNET_DIFFUSION_UNROLL_STEPS", "0")
    with pytest.raises(ValueError, match="NNUNET_DIFFUSION_UNROLL_STEPS='0' must be a whole number >= 1"):
        make(nnUNetTrainerCrossTimestep, {"background": 0, "organ": 1}, tmp_path / "x", monkeypatch)


def test_mirror_axes_setting_reaches_augmentation_and_test_time_mirroring(tmp_path, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_MIRROR_AXES", "2")
    trainer = make(nnUNetTrainerDiffusion, {"background": 0, "organ": 1}, tmp_path, monkeypatch)
    *_, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes == (2,) and trainer.inference_allowed_mirroring_axes == (2,)
    monkeypatch.setenv("NNUNET_DIFFUSION_MIRROR_AXES", "none")
    trainer = make(nnUNetTrainerDiffusion, {"background": 0, "organ": 1}, tmp_path / "b", monkeypatch)
    *_, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None
    monkeypatch.setenv("NNUNET_DIFFUSION_MIRROR_AXES", "3")
    with pytest.raises(ValueError, match="NNUNET_DIFFUSION_MIRROR_AXES='3' must be 'none' or .* in 0..2"):
        make(nnUNetTrainerDiffusion, {"background": 0, "organ": 1}, tmp_path / "c", monkeypatch)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name,optimizer,lr", [("nnUNetTrainerDiffSegRecycling", "AdamW", 1e-3),
                                                ("nnUNetTrainerDiffSegRecycling_SGD", "SGD", 1e-2)])
def test_optimizer_choice_reaches_the_built_trainer(name, optimizer, lr, tmp_path, monkeypatch):
    from nnunet_diffusion.trainers.common import optimizer_variants as variants_optimizer
    trainer_cls = getattr(variants_optimizer, name, nnUNetTrainerDiffSegRecycling)
    trainer = make(trainer_cls, {"background": 0, "organ": 1}, tmp_path, monkeypatch)
    trainer.network = __import__("torch").nn.Linear(2, 2)  # what initialize() would build; only its parameters count
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    assert type(trainer.optimizer).__name__ == optimizer
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    trainer.lr_scheduler.step(500)  # nnU-Net's poly decay over num_epochs (1000) for both
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.5 ** 0.9)
