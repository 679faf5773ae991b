"""DSM trainers at start: the classes of each stage, bad tumour labels and a missing stage-1 model stop them before
any folder is made, and stage 2 starts from stage 1's weights."""
import pytest
import torch
from conftest import initialize_trainer, make_configuration

from nnunet_diffusion.architectures.dsm.network import ABSENT_LOGIT
from nnunet_diffusion.planning import text_embeddings
from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM, nnUNetTrainerDSMStage2
from nnunet_diffusion.trainers.common.pretrained_condition import stock_checkpoint_path

pytestmark = pytest.mark.usefixtures("one_thread")
PLANS = {"label_manager": "LabelManager", "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
         "configurations": {"3d_fullres": make_configuration(3, (4, 8, 16), extra={
             "batch_size": 2, "batch_dice": False, "data_identifier": "nnUNetPlans_3d_fullres"})}}
DATASET = {"labels": {"background": 0, "liver": 1, "tumour": 2, "kidney": 3}, "channel_names": {"0": "CT"},
           "dsm_tumour_labels": ["tumour"]}


class FakeEncoder:
    def __init__(self, name):
        pass

    def embed(self, prompts):
        return torch.stack([torch.arange(6, dtype=torch.float32) * len(p) for p in prompts])


def make(trainer_cls, tmp_path, monkeypatch, dataset=DATASET, **env):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setattr(text_embeddings, "load_text_encoder", FakeEncoder)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return trainer_cls(dict(PLANS, continue_training=False), "3d_fullres", 0, dataset, device=torch.device("cpu"))


def test_stage_1_trains_the_organ_classes_and_stores_its_prompts(tmp_path, monkeypatch):
    trainer = initialize_trainer(make(nnUNetTrainerDSM, tmp_path, monkeypatch), tmp_path)
    settings = trainer.plans_manager.plans["configurations"]["3d_fullres"]["dsm"]
    assert settings["organ_classes"] == [0, 1, 3] and settings["tumour_classes"] == [2]
    assert trainer.trained_classes() == [0, 1, 3]
    assert settings["text"]["prompts"][2] == "A CT scan of a tumour."
    with torch.no_grad():
        logits = trainer.network(torch.randn(1, 1, 8, 8, 8))
    assert (logits[:, 2] == ABSENT_LOGIT).all()  # stage 1 has no query for the tumour class


def test_tumour_labels_that_are_no_foreground_class_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"Tumour labels \['lesion'\] .*are not foreground labels"):
        make(nnUNetTrainerDSM, tmp_path, monkeypatch, NNUNET_DIFFUSION_DSM_TUMOUR_LABELS="lesion")
    assert not (tmp_path / "results").exists()


def test_stage_2_without_a_stage_1_model_names_the_command(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"nnUNetTrainerDSMStage2 \(stage 2\) needs .*nnUNetTrainerDSM__nnUNetPlans__"
                                         r"3d_fullres/fold_0/checkpoint_final.pth, which does not exist. Make it with: "
                                         r"nnUNetv2_train Dataset999_X 3d_fullres 0 -p nnUNetPlans -tr nnUNetTrainerDSM"):
        make(nnUNetTrainerDSMStage2, tmp_path, monkeypatch)
    assert not (tmp_path / "results").exists()


def test_stage_2_starts_from_the_stage_1_weights(tmp_path, monkeypatch):
    first = initialize_trainer(make(nnUNetTrainerDSM, tmp_path, monkeypatch), tmp_path / "a")
    with torch.no_grad():
        first.network.organ_queries.normal_()
    path = stock_checkpoint_path(str(tmp_path / "results"), "Dataset999_X", "nnUNetPlans", "3d_fullres", 0,
                                 "nnUNetTrainerDSM")
    path.parent.mkdir(parents=True, exist_ok=True)
    first.save_checkpoint(str(path))
    second = initialize_trainer(make(nnUNetTrainerDSMStage2, tmp_path, monkeypatch), tmp_path / "b")
    assert second.trained_classes() == [0, 1, 3, 2]
    torch.testing.assert_close(second.network.stage1.organ_queries, first.network.organ_queries)
    out = second.network(torch.randn(1, 1, 8, 8, 8), full=True)
    assert not (out.logits[:, 2] == ABSENT_LOGIT).all()  # the tumour query's mask now
    loss = second.dsm_loss(out, torch.randint(0, 4, (1, 1, 8, 8, 8)))
    loss.backward()
    assert torch.isfinite(loss) and second.network.tumour_queries.grad is not None


def test_the_stored_ssm_state_size_builds_every_kmmm_layers_scan(tmp_path, monkeypatch):
    """DSMOptions.ssm_state (4 by default, 16 in the _ssmState16 variant and in models stored before the setting)
    is N of every kMMM layer's Mamba: its A matrix is (2K, N) for K organ queries."""
    from nnunet_diffusion.trainers.dsm.variants import nnUNetTrainerDSM_ssmState16
    for trainer_cls, state in ((nnUNetTrainerDSM, 4), (nnUNetTrainerDSM_ssmState16, 16)):
        trainer = initialize_trainer(make(trainer_cls, tmp_path, monkeypatch), tmp_path / trainer_cls.__name__)
        assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["dsm"]["ssm_state"] == state
        for layer in trainer.network.layers:
            assert layer.ssm.mamba.layers[0].mixer.A_log.shape == (2 * 3, state)  # K = 3 organ queries


def test_the_stored_finest_output_stride_decides_the_kmmm_layers(tmp_path, monkeypatch):
    """This plan's strides (1, 2, 2) give features at output strides 4 (the bottleneck) and 2: the default
    (min_output_stride 4, the paper's 32 .. 4) builds one kMMM layer, _minOutputStride1 (the default before) two."""
    from nnunet_diffusion.trainers.dsm.variants import nnUNetTrainerDSM_minOutputStride1
    for trainer_cls, stride, layers in ((nnUNetTrainerDSM, 4, 1), (nnUNetTrainerDSM_minOutputStride1, 1, 2)):
        trainer = initialize_trainer(make(trainer_cls, tmp_path, monkeypatch), tmp_path / trainer_cls.__name__)
        assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["dsm"]["min_output_stride"] == stride
        assert trainer.network.backbone.feature_strides == [4, 2] and len(trainer.network.layers) == layers
