"""Staged exports: a case interrupted while writing leaves nothing under a final name; a rerun completes it."""
import os

import numpy as np
import pytest

from nnunet_diffusion.inference import export
from nnunet_diffusion.inference.ensemble import UNCERTAINTY_MAPS
from nnunet_diffusion.inference.export import STAGING_FOLDER, case_complete, case_files, export_case

DATASET = {"file_ending": ".nii.gz"}


class Interrupted(Exception):
    pass


def fake_nnunet_export(fail_after_bytes=None):
    """Stands in for nnU-Net's export_prediction_from_logits: writes the segmentation (and probabilities) under
    the name it is given; with ``fail_after_bytes``, dies half-way through writing the segmentation."""
    def write(logits, properties, configuration_manager, plans_manager, dataset_json, truncated, save_probabilities):
        if save_probabilities:
            np.savez_compressed(truncated + ".npz", probabilities=logits)
            open(truncated + ".pkl", "wb").write(b"properties")
        with open(truncated + dataset_json["file_ending"], "wb") as f:
            f.write(b"x" * (fail_after_bytes or 1000))
            if fail_after_bytes:
                raise Interrupted("killed while writing")
    return write


def test_segmentation_is_moved_into_place_last():
    assert case_files("out/case", ".nii.gz", True, UNCERTAINTY_MAPS) == [
        "out/uncertainty/case_uncertainty.nii.gz", "out/uncertainty/case_mutual_information.nii.gz",
        "out/case.npz", "out/case.pkl", "out/case.nii.gz"]
    assert case_files("out/case", ".nii.gz", False, ("anomaly", "cerebellum"), "dsm") == [
        "out/dsm/case_anomaly.nii.gz", "out/dsm/case_cerebellum.nii.gz", "out/case.nii.gz"]


def test_interrupted_export_leaves_no_final_named_file_and_a_rerun_completes(tmp_path, monkeypatch):
    truncated = str(tmp_path / "case_001")
    monkeypatch.setattr(export, "export_prediction_from_logits", fake_nnunet_export(fail_after_bytes=10))
    with pytest.raises(Interrupted):
        export_case(np.zeros((2, 1, 2, 2)), None, {}, None, None, DATASET, truncated, save_probabilities=True)
    assert sorted(os.listdir(tmp_path)) == [STAGING_FOLDER]             # nothing under a final name
    assert os.path.getsize(tmp_path / STAGING_FOLDER / "case_001.nii.gz") == 10  # the partial file is staged
    assert not case_complete(truncated, ".nii.gz", True)

    monkeypatch.setattr(export, "export_prediction_from_logits", fake_nnunet_export())
    export_case(np.zeros((2, 1, 2, 2)), None, {}, None, None, DATASET, truncated, save_probabilities=True)
    assert sorted(os.listdir(tmp_path)) == ["case_001.nii.gz", "case_001.npz", "case_001.pkl"]  # staging removed
    assert os.path.getsize(truncated + ".nii.gz") == 1000
    assert case_complete(truncated, ".nii.gz", True)
    assert not case_complete(truncated, ".nii.gz", True, UNCERTAINTY_MAPS)  # --uncertainty also needs the maps


def test_a_failing_uncertainty_map_keeps_the_segmentation_out_too(tmp_path, monkeypatch):
    truncated = str(tmp_path / "case_002")
    monkeypatch.setattr(export, "export_prediction_from_logits", fake_nnunet_export())
    monkeypatch.setattr(export, "maps_in_input_geometry", lambda maps, *a: maps)

    def dies(array, filename, properties):
        open(filename, "wb").write(b"partial")
        raise Interrupted("disk full")
    monkeypatch.setattr(export, "write_float_image", dies)
    with pytest.raises(Interrupted):
        export_case(np.zeros((2, 1, 2, 2)), np.zeros((2, 1, 2, 2)), {}, None, None, DATASET, truncated, False)
    assert sorted(os.listdir(tmp_path)) == [STAGING_FOLDER, "uncertainty"]  # no segmentation, no map
    assert os.listdir(tmp_path / "uncertainty") == []
