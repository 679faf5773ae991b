"""Data a trainer cannot use stops it at start, with the fix in the message and before any folder is made (or, for
checks that need the preprocessed cases, before the first iteration)."""
import json
import shutil

import pytest
import torch
from conftest import make_configuration, run
from faults_helpers import train_command

from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM
from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff

TRAINERS = [nnUNetTrainerDiffusion, nnUNetTrainerCrossTimestep, nnUNetTrainerUniSegDiff, nnUNetTrainerTextDiffSeg,
            nnUNetTrainerDSM]
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def make(trainer_cls, tmp_path, monkeypatch, configurations=None, configuration="3d_fullres", labels=LABELS):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    plans = {"label_manager": "LabelManager", "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
             "continue_training": False,
             "configurations": configurations or {"3d_fullres": make_configuration(
                 3, extra={"data_identifier": "nnUNetPlans_3d_fullres"})}}
    dataset_json = {"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    return trainer_cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))


def refused(trainer_cls, tmp_path, monkeypatch, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        make(trainer_cls, tmp_path, monkeypatch, **kwargs)
    assert not (tmp_path / "results").exists()  # no folder was made


@pytest.mark.parametrize("trainer_cls", TRAINERS)
def test_region_based_labels(trainer_cls, tmp_path, monkeypatch):
    refused(trainer_cls, tmp_path, monkeypatch, "cannot train region-based datasets.*stock nnUNetTrainer",
            labels={"background": 0, "whole": [1, 2], "core": 2})


@pytest.mark.parametrize("trainer_cls", TRAINERS)
def test_ignore_label(trainer_cls, tmp_path, monkeypatch):
    refused(trainer_cls, tmp_path, monkeypatch, "'ignore' label.*Remove 'ignore'",
            labels={"background": 0, "liver": 1, "ignore": 2})


@pytest.mark.parametrize("trainer_cls", TRAINERS)
def test_non_consecutive_label_values(trainer_cls, tmp_path, monkeypatch):
    refused(trainer_cls, tmp_path, monkeypatch, r"has the values \[0, 1, 3\]; .* needs consecutive values 0..2 .*"
            r"Renumber the label files", labels={"background": 0, "liver": 1, "tumour": 3})


@pytest.mark.parametrize("trainer_cls", TRAINERS)
def test_2d_data_with_a_3d_trainer(trainer_cls, tmp_path, monkeypatch):
    refused(trainer_cls, tmp_path, monkeypatch, r"has 2D images .* nnU-Net plans only '2d': train "
            r"`nnUNetv2_train Dataset999_X 2d <fold>", configurations={"2d": make_configuration(2)})
    one_slice = make_configuration(3, patch=[1, 8, 8])
    refused(trainer_cls, tmp_path, monkeypatch, r"patch \[1, 8, 8\]: a 3d network needs three axes",
            configurations={"3d_fullres": one_slice})


@pytest.mark.parametrize("trainer_cls", TRAINERS)
def test_patch_the_strides_cannot_divide(trainer_cls, tmp_path, monkeypatch):
    odd = make_configuration(3, patch=[8, 8, 9])
    refused(trainer_cls, tmp_path, monkeypatch, r"the patch \[8, 8, 9\] is not divisible by the product of the "
            r"strides \[2, 2, 2\] along axes \[2\].*e.g. \[8, 8, 10\]", configurations={"3d_fullres": odd})
    stride_3 = make_configuration(3, patch=[8, 8, 8])
    stride_3["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [3, 3, 3]]
    refused(trainer_cls, tmp_path, monkeypatch, r"strides \[3, 3, 3\] along axes \[0, 1, 2\]",
            configurations={"3d_fullres": stride_3})


@pytest.mark.parametrize("trainer_cls", TRAINERS)
def test_a_network_class_our_encoders_cannot_build_is_refused(trainer_cls, tmp_path, monkeypatch):
    """Plans of another network class than nnU-Net's two U-Nets: refused at start, not silently built as another
    network than the plans ask for (ResEnc plans are built: tests/trainers/test_residual_encoder_plans.py)."""
    other = make_configuration(3)
    other["architecture"]["network_class_name"] = "dynamic_network_architectures.architectures.primus.Primus"
    refused(trainer_cls, tmp_path, monkeypatch, r"asks for a Primus.*PlainConvUNet or ResidualEncoderUNet.*"
            r"-p nnUNetResEncUNetMPlans", configurations={"3d_fullres": other})


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerTextDiffSeg, nnUNetTrainerDSM])
@pytest.mark.parametrize("name", ["1", "label_2", "foreground"])
def test_text_trainer_without_class_names(trainer_cls, name, tmp_path, monkeypatch):
    refused(trainer_cls, tmp_path, monkeypatch, f"names class '{name}' with a placeholder.*Name the classes in "
            f"'labels'.*or describe them in 'label_descriptions'", labels={"background": 0, "liver": 1, name: 2})


def test_placeholder_names_are_fine_for_trainers_without_text(tmp_path, monkeypatch):
    trainer = make(nnUNetTrainerDiffusion, tmp_path, monkeypatch, labels={"background": 0, "1": 1, "2": 2})
    assert trainer.label_manager.num_segmentation_heads == 3


@pytest.fixture
def preprocessed_copy(nnunet, tmp_path):
    """The session's preprocessed tiny dataset, copied to a root of its own to be changed."""
    source = next(p for p in (nnunet["root"] / "nnUNet_preprocessed").iterdir() if p.is_dir())
    shutil.copytree(source, tmp_path / "preprocessed" / source.name)
    (tmp_path / "results").mkdir()
    env = {**nnunet["env"], "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results")}
    return env, tmp_path / "preprocessed" / source.name


def test_fewer_training_cases_than_folds(preprocessed_copy):
    env, folder = preprocessed_copy
    (folder / "splits_final.json").unlink(missing_ok=True)
    data = folder / "nnUNetPlans_2d"
    identifiers = sorted(p.stem for p in data.glob("*.pkl"))
    for identifier in identifiers[3:]:
        for path in data.glob(f"{identifier}[._]*"):
            path.unlink()
    result = run(train_command(1), env, check=False)
    assert result.returncode != 0
    assert ("The dataset has 3 training cases, fewer than nnU-Net's 5 cross-validation folds. Train on all cases with "
            "fold 'all'") in result.stderr
    assert not list((folder.parent.parent.parent / "results").rglob("checkpoint_*.pth"))


def test_class_absent_from_every_training_case(preprocessed_copy):
    env, folder = preprocessed_copy
    dataset = json.loads((folder / "dataset.json").read_text())
    absent = len(dataset["labels"])
    dataset["labels"]["claustrum"] = absent  # consecutive, but in no label file
    (folder / "dataset.json").write_text(json.dumps(dataset))
    result = run(train_command(1), env, check=False)
    assert result.returncode != 0
    assert f"Label value(s) [{absent}] of dataset.json 'labels' occur in none of the 6 preprocessed training cases" \
        in result.stderr, result.stderr[-1000:]
    assert "cannot learn a class it never sees" in result.stderr
