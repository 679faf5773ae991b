"""A model saved before the one-folder-per-method layout (tests/data/legacy_model, made by make_legacy_model.py
with commit 420bb00's code) still predicts, with both predict commands, exactly what that code predicted."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run

from nnunet_diffusion.cli import trainer_path

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_model"


@pytest.mark.parametrize("command, expected", [(["nnUNetv2_predict"], "expected_nnUNetv2_predict"),
                                               (["nnunet-diffusion", "predict"], "expected_nnunet_diffusion_predict")])
def test_a_model_saved_by_the_old_layout_predicts_as_it_did(command, expected, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(LEGACY / "results", results)
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(tmp_path),
           "nnUNet_preprocessed": str(tmp_path), "nnUNet_extTrainer": trainer_path(), "nnUNet_n_proc_DA": "0",
           "nnUNet_def_n_proc": "1"}
    out = tmp_path / "prediction"
    run([*command, "-i", str(LEGACY / "imagesTs"), "-o", str(out), "-d", "503", "-p", "nnUNetPlans_CPU", "-c", "2d",
         "-tr", "nnUNetTrainerCrossTimestep", "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    now = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
    then = sitk.GetArrayFromImage(sitk.ReadImage(str(LEGACY / expected / "case.nii.gz")))
    assert len(np.unique(then)) > 2  # a segmentation with several classes, not a blank one
    np.testing.assert_array_equal(now, then)
