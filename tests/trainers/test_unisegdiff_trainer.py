"""nnUNetTrainerUniSegDiff's condition network: where it comes from, the errors, and the pre-training phase."""
import pytest
import torch
from conftest import initialize_trainer as initialize, make_configuration

from nnunet_diffusion.trainers.common.pretrained_condition import stock_checkpoint_path
from nnunet_diffusion.trainers.unisegdiff.trainer import ENV_CONDITION_CHECKPOINT, nnUNetTrainerUniSegDiff

pytestmark = pytest.mark.usefixtures("one_thread")
PLANS = {"label_manager": "LabelManager", "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
         "configurations": {"3d_fullres": make_configuration(3, extra={"batch_size": 2, "batch_dice": False})}}
DATASET = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "CT"}}


def make(tmp_path, monkeypatch, **env):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return nnUNetTrainerUniSegDiff(dict(PLANS, continue_training=False), "3d_fullres", 0, DATASET,
                                   device=torch.device("cpu"))


def save_stock(tmp_path, network_weights, configuration="3d_fullres"):
    path = stock_checkpoint_path(str(tmp_path / "results"), "Dataset999_X", "nnUNetPlans", "3d_fullres", 0)
    path.parent.mkdir(parents=True)
    torch.save({"network_weights": network_weights, "init_args": {"plans": {"plans_name": "nnUNetPlans"},
                                                                   "configuration": configuration}}, path)
    return path


def test_a_named_checkpoint_that_is_missing_fails_before_any_folder_is_made(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "checkpoint_final.pth"
    with pytest.raises(ValueError, match=rf"{ENV_CONDITION_CHECKPOINT}=.*{missing}, which does not exist.*"
                                         r"nnUNetv2_train Dataset999_X 3d_fullres 0 -p nnUNetPlans"):
        make(tmp_path, monkeypatch, **{ENV_CONDITION_CHECKPOINT: str(missing)})
    assert not (tmp_path / "results").exists()


def test_a_stock_checkpoint_of_another_configuration_is_refused_with_the_command(tmp_path, monkeypatch):
    save_stock(tmp_path, {}, configuration="2d")
    with pytest.raises(ValueError, match=r"stock model in nnUNet_results.*configuration '2d'.*nnUNetv2_train"):
        make(tmp_path, monkeypatch)


def test_the_stock_checkpoint_in_nnunet_results_becomes_the_frozen_cfenet(tmp_path, monkeypatch):
    reference = nnUNetTrainerUniSegDiff.build_network_architecture(
        None, make(tmp_path / "probe", monkeypatch).configuration_manager, 1, 3, False).denoiser.cfenet
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    path = save_stock(tmp_path, reference.state_dict())
    trainer = make(tmp_path, monkeypatch)
    assert trainer.condition_source == f"stock nnU-Net checkpoint {path}, frozen"
    initialize(trainer, tmp_path)
    cfenet = trainer.network.denoiser.cfenet
    for (name, a), b in zip(reference.state_dict().items(), cfenet.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not trainer.pretraining() and cfenet.parameters().__next__().requires_grad is False
    stored = trainer.plans_manager.plans["configurations"]["3d_fullres"]["diffusion"]
    assert stored["condition_source"] == trainer.condition_source and stored["staged"]["upper"] == 599


def batch():
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    return {"data": torch.randn(2, 1, 8, 8, 8), "target": labels}


def test_without_a_stock_model_cfenet_is_pre_trained_first_then_frozen(tmp_path, monkeypatch):
    trainer = make(tmp_path, monkeypatch)
    assert trainer.condition_source.startswith("pre-trained in this run for the first 30%")
    initialize(trainer, tmp_path)
    denoiser = trainer.network.denoiser

    def snapshot():
        return {k: v.clone() for k, v in trainer.network.state_dict().items()}

    trainer.current_epoch = 0  # progress 0 < 30%: the pre-training phase trains CFENet alone
    before = snapshot()
    trainer.train_step(batch())
    after = snapshot()
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"cfenet"}
    trainer.current_epoch = trainer.num_epochs // 2  # past the phase: frozen, DNet trains
    trainer.train_step(batch())
    assert denoiser.cfenet_frozen()
    final = snapshot()
    assert all(torch.equal(after[k], final[k]) for k in after if k.startswith("denoiser.cfenet."))
    assert any(not torch.equal(after[k], final[k]) for k in after if k.startswith("denoiser.decoders."))
