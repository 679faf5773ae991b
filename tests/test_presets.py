"""nnU-Net's own presets with our trainers, through nnU-Net's own commands.

ResEnc: nnU-Net's Residual Encoder planner (-pl nnUNetPlannerResEncM), a diffusion trainer trained and predicted on
its plans, residual blocks in the checkpoint.

The cascade: 3d_lowres trained on every case
(its final validation writes the next stage's inputs), 3d_cascade_fullres trained on the images plus the one-hot
lowres segmentations, both stages predicted with nnUNetv2_predict and nnunet-diffusion predict.

The tiny dataset is too small for nnU-Net's planner to make a lowres stage, so the test writes the plans a planner
writes for a large image (a coarser 3d_lowres with ``next_stage``, 3d_cascade_fullres inheriting 3d_fullres with
``previous_stage``) under their own plans name, beside the session's nnUNetPlans."""
import copy
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from conftest import DATASET_ID, run

from nnunet_diffusion.trainers.common.fault_safety import read_checkpoint

TRAINER = "nnUNetTrainerDiffusion"
PLANS = "nnUNetPlansCascade"


def write_cascade_plans(preprocessed: Path) -> None:
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    fullres = plans["configurations"]["3d_fullres"]
    lowres = copy.deepcopy(fullres)
    lowres.update(data_identifier=f"{PLANS}_3d_lowres", spacing=[s * 1.5 for s in fullres["spacing"]],
                  median_image_size_in_voxels=[round(n / 1.5) for n in fullres["median_image_size_in_voxels"]],
                  next_stage="3d_cascade_fullres")
    plans["configurations"] = {"3d_fullres": fullres, "3d_lowres": lowres,
                               "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}
    (preprocessed / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))


def predict(nnunet, command, configuration, fold, out, *extra):
    run([*command, "-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", configuration,
         "-tr", TRAINER, "-p", PLANS, "-f", fold, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta",
         *extra], nnunet["env"])
    return {p.name: p for p in sorted(out.glob("*.nii.gz"))}


def test_the_cascade_trains_and_predicts_with_a_diffusion_trainer(nnunet):
    env, root = nnunet["env"], nnunet["root"]
    preprocessed = Path(env["nnUNet_preprocessed"]) / nnunet["raw"].name
    results = Path(env["nnUNet_results"]) / nnunet["raw"].name
    write_cascade_plans(preprocessed)
    run(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", PLANS, "-c", "3d_lowres", "-np", "1"], env)

    # lowres on every case ('all'): its final validation segments every case for the next stage
    run(["nnUNetv2_train", str(DATASET_ID), "3d_lowres", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)
    next_stage = results / f"{TRAINER}__{PLANS}__3d_lowres" / "predicted_next_stage" / "3d_cascade_fullres"
    cases = sorted(p.name[:-len(".nii.gz")] for p in (nnunet["raw"] / "labelsTr").glob("*.nii.gz"))
    assert sorted(p.name.split(".")[0] for p in next_stage.glob("case_*")) == cases  # .b2nd in nnU-Net 2.8

    # without its final validation (nnU-Net's, on the same inputs as the predict commands below)
    run(["nnUNetv2_train", str(DATASET_ID), "3d_cascade_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"],
        {**env, "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"})
    model = results / f"{TRAINER}__{PLANS}__3d_cascade_fullres"
    checkpoint = read_checkpoint(str(model / "fold_0" / "checkpoint_final.pth"))
    labels = json.loads((nnunet["raw"] / "dataset.json").read_text())["labels"]
    # the image encoder sees the image channel plus one channel per foreground class of the lowres segmentation
    image_convs = [w for k, w in checkpoint["network_weights"].items() if "image_encoder" in k and w.ndim == 5]
    assert image_convs[0].shape[1] == 1 + (len(labels) - 1)
    assert all(torch.isfinite(w).all() for w in checkpoint["network_weights"].values() if w.is_floating_point())

    low = predict(nnunet, ["nnUNetv2_predict"], "3d_lowres", "all", root / "cascade_low")
    assert len(low) == len(list((nnunet["raw"] / "imagesTs").glob("*.nii.gz")))
    stock = predict(nnunet, ["nnUNetv2_predict"], "3d_cascade_fullres", "0", root / "cascade_stock",
                    "-prev_stage_predictions", str(root / "cascade_low"))
    ours = predict(nnunet, ["nnunet-diffusion", "predict"], "3d_cascade_fullres", "0", root / "cascade_ours",
                   "-prev_stage_predictions", str(root / "cascade_low"))
    assert stock.keys() == ours.keys() == low.keys()
    for name in stock:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p[name]))) for p in (stock, ours))
        assert (a != b).mean() < 1e-3  # the same windows, batched differently: equal up to rounding at the argmax
        assert set(np.unique(a)) <= set(labels.values())

    # without the previous stage's segmentations our command stops before loading the model:
    # tests/faults/test_bad_input.py


def test_resenc_m_plans_train_and_predict_with_residual_blocks(nnunet):
    """nnU-Net's ResEnc M preset, as its documentation says: plan with the planner, train with -p."""
    env, root = nnunet["env"], nnunet["root"]
    planning = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # nnU-Net's planner crashes with 0
    run(["nnUNetv2_plan_experiment", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerResEncM"], planning)
    run(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", "nnUNetResEncUNetMPlans", "-c", "2d", "-np",
         "1"], env)
    trainer = "nnUNetTrainerDiffSegRecycling"
    run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-p", "nnUNetResEncUNetMPlans", "-device", "cpu"],
        {**env, "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"})
    model = Path(env["nnUNet_results"]) / nnunet["raw"].name / f"{trainer}__nnUNetResEncUNetMPlans__2d"
    weights = read_checkpoint(str(model / "fold_0" / "checkpoint_final.pth"))["network_weights"]
    stored = json.loads((model / "plans.json").read_text())["configurations"]["2d"]
    arch = stored["architecture"]["arch_kwargs"]
    assert stored["diffusion"]["encoder_blocks"] == "residual" and "n_blocks_per_stage" in arch
    # ResEnc's stem (a conv block) then BasicBlockD's (conv1, conv2) in stage 0, residual blocks in the last stage
    last = arch["n_stages"] - 1
    for key in (".encoder.stages.0.0.convs.0.", ".encoder.stages.0.1.blocks.0.conv1.",
                f".encoder.stages.{last}.blocks.0.conv2."):
        assert any(key in k for k in weights), key
    out = root / "pred_resenc"
    run(["nnUNetv2_predict", "-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", "2d",
         "-tr", trainer, "-p", "nnUNetResEncUNetMPlans", "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
         "--disable_tta"], env)
    assert len(list(out.glob("*.nii.gz"))) == len(list((nnunet["raw"] / "imagesTs").glob("*.nii.gz")))
