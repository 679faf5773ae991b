"""Truncated, corrupted and foreign checkpoints, a hand-edited plans.json and a broken text-embedding cache: an
error that names the file, what is wrong and the fix, before any work starts, and the file left as it was."""
import copy
import json
import shutil

import pytest
import torch
from conftest import DATASET_ID, run, save_tiny_text_model
from faults_helpers import TRAINER, train_command, trained  # noqa: F401,F811 (fixture)

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_diffusion.inference.predictor import DiffusionPredictor
from nnunet_diffusion.planning.text_embeddings import cache_path, class_text_embeddings
from nnunet_diffusion.text.encoders import TextModelError
from nnunet_diffusion.trainers.common.data_checks import DataCheckError
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.common.fault_safety import checkpoint_mismatch, read_checkpoint


@pytest.fixture
def model(nnunet, trained, tmp_path):
    """A copy of the trained model's results in a results folder of its own, to damage freely."""
    results = tmp_path / "results"
    source = trained.parent.parent  # nnUNet_results/<dataset>
    shutil.copytree(source / trained.parent.name, results / source.name / trained.parent.name)
    env = {**nnunet["env"], "nnUNet_results": str(results)}
    return env, results / source.name / trained.parent.name


def test_truncated_checkpoint_stops_resume_and_prediction_naming_the_file(nnunet, model, tmp_path):
    env, folder = model
    checkpoint = folder / "fold_4" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    damaged = checkpoint.read_bytes()
    result = run(train_command(4, "--c"), env, check=False)
    assert result.returncode != 0
    for message in (result.stderr, refusal_at_prediction(folder)):
        assert f"{checkpoint} cannot be read as a checkpoint: it is truncated or corrupted" in message
        assert "Move it away and resume from another checkpoint" in message
    assert checkpoint.read_bytes() == damaged  # nothing was written over it


def refusal_at_prediction(folder) -> str:
    """What nnunet-diffusion predict's predictor says when it loads the model folder (before any case)."""
    with pytest.raises(ValueError) as error:
        DiffusionPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(str(folder), (4,))
    return str(error.value)


def test_checkpoint_of_another_trainer_is_refused_on_resume(nnunet, model):
    env, folder = model
    path = folder / "fold_4" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerDiffSegRecycling"  # as if copied from that trainer's folder
    torch.save(checkpoint, path)
    before = path.read_bytes()
    result = run(train_command(4, "--c"), env, check=False)
    assert result.returncode != 0
    assert (f"Cannot resume from {path}: it was written by nnUNetTrainerDiffSegRecycling, not {TRAINER}. Resume it "
            f"with -tr nnUNetTrainerDiffSegRecycling") in result.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("change, message", [
    (lambda c: c["init_args"].update(configuration="3d_fullres"),
     "it was trained on configuration '3d_fullres', this run is '2d'"),
    (lambda c: c["init_args"]["plans"].update(plans_name="nnUNetResEncUNetMPlans"),
     "it was trained with plans_name 'nnUNetResEncUNetMPlans', this run has 'nnUNetPlans'"),
    (lambda c: c["init_args"]["plans"]["configurations"]["2d"].update(patch_size=[64, 64]),
     "the plans changed since it was trained (patch_size: [64, 64] -> "),
    (lambda c: c["init_args"]["plans"]["configurations"]["2d"]["diffusion"].update(prediction="x0"),
     "it was trained with other diffusion settings (prediction: x0 -> eps); resume with the NNUNET_DIFFUSION_* "
     "variables of the first run"),
])
def test_checkpoint_of_other_plans_configuration_or_settings_does_not_fit(trained, change, message):
    """The same check as the resume above (``load_checkpoint``), on the real checkpoint's content."""
    checkpoint = read_checkpoint(str(trained / "checkpoint_final.pth"))
    plans = copy.deepcopy(checkpoint["init_args"]["plans"])  # this run's plans
    assert checkpoint_mismatch(checkpoint, TRAINER, plans, "2d", "diffusion") is None
    change(checkpoint)
    assert message in checkpoint_mismatch(checkpoint, TRAINER, plans, "2d", "diffusion")


def test_checkpoint_moved_into_another_trainers_folder_is_refused_at_prediction(model):
    _, folder = model
    foreign = folder.parent / folder.name.replace(TRAINER, "nnUNetTrainerDiffusion_x0")
    shutil.copytree(folder, foreign)
    assert (f"was written by {TRAINER}, but it lies in a model folder of nnUNetTrainerDiffusion_x0"
            in refusal_at_prediction(foreign))


def test_hand_edited_diffusion_block_of_plans_json_stops_prediction_naming_the_file(nnunet, model, tmp_path):
    env, folder = model
    plans_file = folder / "plans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["diffusion"]["prediction"] = "v"
    plans_file.write_text(json.dumps(plans))
    out = tmp_path / "pred"
    result = run(["nnUNetv2_predict", "-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                  "-c", "2d", "-tr", TRAINER, "-f", "4", "-device", "cpu", "-npp", "0", "-nps", "0"], env, check=False)
    assert result.returncode != 0
    assert (f"nnUNet_results/{folder.parent.name}/{folder.name}/plans.json, 'diffusion' block: prediction must be "
            f"'eps' or 'x0', not 'v'") in result.stderr
    assert "restore the plans.json the model was trained with" in result.stderr
    assert not any(out.glob("*.nii.gz"))


@pytest.mark.parametrize("edit, message", [
    ({"num_train_timesteps": "1000"}, "num_train_timesteps is '1000', not of type int"),
    ({"recycling": 1}, "recycling is 1, not of type bool"),
    ({"noise_schedule": "sigmoid"}, "Unknown noise schedule 'sigmoid'"),
    ({"sampler": {"kind": "ddim", "step": 10}}, "unknown key(s) ['step'] in sampler"),
    ({"sampler": {"kind": "euler", "steps": 10}}, "Unknown sampler 'euler'"),
    ({"num_train_timestep": 1000}, "unknown key(s) ['num_train_timestep'] in the block"),
])
def test_every_kind_of_bad_edit_is_named(trained, edit, message):
    """What the prediction above does when it builds the network, for more kinds of edits."""
    plans = json.loads((trained.parent / "plans.json").read_text())
    plans["configurations"]["2d"]["diffusion"].update(edit)
    manager = PlansManager(plans)
    with pytest.raises(DataCheckError) as error:
        nnUNetTrainerDiffusion.build_network_architecture(manager, manager.get_configuration("2d"), 1, 3)
    assert f"{trained.parent.name}/plans.json, 'diffusion' block: " in str(error.value)
    assert message in str(error.value)


DATASET_JSON = {"labels": {"background": 0, "liver": 1, "tumour": 2}, "channel_names": {"0": "CT"}}


def test_corrupted_text_cache_is_remade_and_without_a_text_model_the_error_names_the_cache(tmp_path):
    model = save_tiny_text_model(tmp_path / "text_model")
    made = class_text_embeddings(DATASET_JSON, tmp_path, model, log=lambda line: None)
    path = cache_path(tmp_path, model)
    path.write_bytes(path.read_bytes()[:40])  # a copy cut short
    lines = []
    again = class_text_embeddings(DATASET_JSON, tmp_path, model, log=lines.append)
    assert any(f"the cache {path} is truncated or corrupted: recomputing" in line for line in lines)
    torch.testing.assert_close(again.vectors, made.vectors)
    assert again.vectors.shape == (3, 24)  # the tiny model's hidden size
    # no cache, and the model cannot be loaded: the error says which cache and why it is needed
    missing_model = str(tmp_path / "no_such_model")
    missing_cache = cache_path(tmp_path, missing_model)
    with pytest.raises(TextModelError, match=f"must be computed \\(there is no cache at {missing_cache}\\)"):
        class_text_embeddings(DATASET_JSON, tmp_path, missing_model, log=lambda line: None)
    missing_cache.parent.mkdir(parents=True, exist_ok=True)
    missing_cache.write_bytes(b"garbage")
    with pytest.raises(TextModelError, match=f"the cache {missing_cache} is truncated or corrupted"):
        class_text_embeddings(DATASET_JSON, tmp_path, missing_model, log=lambda line: None)
