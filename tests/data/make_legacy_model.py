"""Makes tests/data/legacy_model/: a tiny Cross-Timestep model as the package saved it before the one-folder-per-
method layout (commit 420bb00), and that code's predictions of one synthetic case with both predict commands.

    PYTHONPATH=<checkout of 420bb00> python tests/data/make_legacy_model.py <Dataset503 preprocessed folder>

The plans are the benchmark dataset's CPU plans shrunk to a 2-stage, 4/8-feature 2d U-Net (the checkpoint stays
small); the weights are a seeded initialisation saved by the trainer's own save_checkpoint (what matters is that
the files written then still load and predict the same now). tests/test_legacy_model.py checks it.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent / "legacy_model"
DATASET, PLANS, TRAINER = "Dataset503_BrainAtlasBench", "nnUNetPlans_CPU", "nnUNetTrainerCrossTimestep"


def tiny_plans(plans: dict) -> dict:
    config = plans["configurations"]["2d"]
    arch = config["architecture"]["arch_kwargs"]
    arch.update(n_stages=2, features_per_stage=[4, 8], kernel_sizes=arch["kernel_sizes"][:2],
                strides=arch["strides"][:2], n_conv_per_stage=[1, 1], n_conv_per_stage_decoder=[1])
    config.update(patch_size=[16, 16], batch_size=2)
    plans["configurations"] = {"2d": config}
    return plans


def main(preprocessed: str):
    source = Path(preprocessed)
    results = HERE / "results"
    shutil.rmtree(HERE, ignore_errors=True)
    results.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(nnUNet_results=str(results), nnUNet_preprocessed=tmp, nnUNet_raw=tmp,
                          NNUNET_DIFFUSION_CHAIN_STEPS="2")
        import torch
        from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as stock_module
        from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
        plans = tiny_plans(json.loads((source / f"{PLANS}.json").read_text()))
        plans["continue_training"] = False  # what nnUNetv2_train adds
        dataset_json = json.loads((source / "dataset.json").read_text())
        torch.manual_seed(0)
        trainer = nnUNetTrainerCrossTimestep(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
        stock_module.infer_dataset_class = lambda folder: None
        trainer.initialize()
        os.makedirs(trainer.output_folder, exist_ok=True)
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
        model = Path(trainer.output_folder_base)
        (model / "plans.json").write_text(json.dumps(trainer.plans_manager.plans, indent=1))
        (model / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    images = HERE / "imagesTs"
    images.mkdir()
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=(6, 24, 20)).astype(np.float32))
    image.SetSpacing((5.0, 5.0, 5.0))
    sitk.WriteImage(image, str(images / "case_0000.nii.gz"))
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    common = ["-i", str(images), "-d", "503", "-p", PLANS, "-c", "2d", "-tr", TRAINER, "-f", "0", "-device", "cpu",
              "-npp", "0", "-nps", "0"]
    for command, out in ((["nnUNetv2_predict"], "expected_nnUNetv2_predict"),
                         (["nnunet-diffusion", "predict"], "expected_nnunet_diffusion_predict")):
        subprocess.run([*command, *common, "-o", str(HERE / out)], env=env, check=True)
        for extra in (HERE / out).iterdir():
            if extra.name != "case.nii.gz":
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()


if __name__ == "__main__":
    main(sys.argv[1])
