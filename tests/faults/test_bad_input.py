"""Bad input gets a clear error and loses nothing: ``nnunet-diffusion predict`` checks every input before the first
case (one message per bad case: the file, what is wrong, the fix), predicts the good cases, exits 1 when it
refused one, and --continue_prediction picks the refused ones up once fixed; a truncated raw training image stops
training at its start (docs/explanation/faults.md)."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATASET_ID, run
from faults_helpers import TRAINER, train_command, trained  # noqa: F401,F811 (fixture)

from nnunet_diffusion.inference.input_checks import check_inputs
from nnunet_diffusion.inference.whole_files import whole_file_problem

ENDING = ".nii.gz"


def predict_command(source, out, *extra, configuration="2d"):
    return ["nnunet-diffusion", "predict", "-i", str(source), "-o", str(out), "-d", str(DATASET_ID), "-c",
            configuration, "-tr", TRAINER, "-f", "4", "-device", "cpu", "-npp", "0", "-nps", "0", "--steps", "2",
            "--disable_progress_bar", *extra]


def cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def test_bad_cases_are_refused_one_message_each_the_good_ones_predicted_and_picked_up_once_fixed(nnunet, trained,
                                                                                              tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(nnunet["raw"] / "imagesTs", source)
    good = sorted(p.name[:-len("_0000" + ENDING)] for p in source.iterdir())  # case_0006, case_0007
    image = source / f"{good[0]}_0000{ENDING}"
    data = image.read_bytes()
    (source / f"truncated_0000{ENDING}").write_bytes(data[:len(data) // 2])  # a copy cut short
    corrupted = bytearray(data)
    corrupted[-8] ^= 0xFF  # the gzip trailer's CRC: the content no longer matches it
    (source / f"corrupted_0000{ENDING}").write_bytes(bytes(corrupted))
    shutil.copy(image, source / f"nosuffix{ENDING}")  # no _0000
    volume = sitk.ReadImage(str(image))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(source / f"fourd_0000{ENDING}"))  # two volumes in one file
    for channel in (0, 1):  # a second channel the one-channel model does not take
        shutil.copy(image, source / f"extra_{channel:04d}{ENDING}")

    result = run(predict_command(source, out), nnunet["env"], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for message in (
            f"truncated: truncated_0000{ENDING} is truncated (its gzip stream ends early: a copy cut short): copy it "
            f"again from its source",
            f"corrupted: corrupted_0000{ENDING} is corrupted (gzip: CRC check failed",
            f"nosuffix: nosuffix{ENDING} has no channel suffix: rename it nosuffix_0000{ENDING}",
            f"fourd: fourd_0000{ENDING} is a 4D image (2 volumes in one file), but the model takes 1 channel (0 'T1'): "
            f"save the volume to segment as a 3D image",
            f"extra: extra_0001{ENDING} would be channel 1, but the model takes 1 (0 'T1'): move it out of the input "
            f"folder"):
        assert result.stderr.count(message) == 2, (message, result.stderr[-3000:])  # before the first case, at the end
    assert f"5 of 7 cases in {source} cannot be predicted (the other 2 will be)" in result.stderr
    assert "were refused; no segmentation was written for them" in result.stderr
    assert "run the same command with --continue_prediction" in result.stderr
    assert sorted(p.name for p in out.glob(f"*{ENDING}")) == [f"{case}{ENDING}" for case in good]
    predicted = {p.name: p.read_bytes() for p in out.glob(f"*{ENDING}")}

    # the user fixes the refused cases; --continue_prediction predicts them, and only them
    shutil.copy(image, source / f"truncated_0000{ENDING}")
    shutil.copy(image, source / f"corrupted_0000{ENDING}")
    (source / f"nosuffix{ENDING}").rename(source / f"nosuffix_0000{ENDING}")
    shutil.copy(image, source / f"fourd_0000{ENDING}")
    (source / f"extra_0001{ENDING}").unlink()
    again = run(predict_command(source, out, "--continue_prediction"), nnunet["env"], check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cannot be predicted" not in again.stderr
    assert "2 cases are complete, predicting the other 5" in again.stdout
    names = sorted(good + ["corrupted", "extra", "fourd", "nosuffix", "truncated"])
    assert sorted(p.name for p in out.glob(f"*{ENDING}")) == [f"{case}{ENDING}" for case in names]
    assert all(predicted[name] == (out / name).read_bytes() for name in predicted)  # kept as they were


def test_missing_or_empty_input_folder_stops_with_the_fix_before_the_model_loads(nnunet, trained, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "nope", "(-i) does not exist. Give the folder that holds the images to segment"),
                            (tmp_path / "empty", "is empty: put the images to segment there")):
        result = run(predict_command(folder, tmp_path / "out"), nnunet["env"], check=False)
        assert result.returncode == 1
        assert f"The input folder {folder} {message}, one file per channel: <case>_0000{ENDING} (T1)." \
            in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_2d_image_for_a_3d_configuration_is_refused(nnunet, trained, tmp_path):
    """Through the command: a model folder of the 3d_fullres configuration (its dataset.json and plans.json; the
    check comes before the model loads, so no weights are needed when every case is refused)."""
    results = tmp_path / "results"
    model = results / nnunet["raw"].name / f"{TRAINER}__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(trained.parent / name, model / name)
    source = tmp_path / "in"
    source.mkdir()
    volume = sitk.ReadImage(str(next((nnunet["raw"] / "imagesTs").iterdir())))
    sitk.WriteImage(volume[:, :, volume.GetSize()[2] // 2], str(source / f"slice_0000{ENDING}"))
    env = {**nnunet["env"], "nnUNet_results": str(results)}
    result = run(predict_command(source, tmp_path / "out", configuration="3d_fullres"), env, check=False)
    assert result.returncode == 1
    assert (f"slice: slice_0000{ENDING} is a 2D image, but configuration '3d_fullres' segments 3D volumes: give the "
            f"3D volume, or predict with a model of 2D images (-c 2d)") in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_channels_of_another_grid_and_a_missing_channel(trained, tmp_path):
    """The same check on a two-channel dataset.json (the command's ``check_inputs``)."""
    dataset_json = json.loads((trained.parent / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "T1", "1": "T2"}
    plans = json.loads((trained.parent / "plans.json").read_text())
    image = sitk.GetImageFromArray(np.zeros((6, 8, 10), np.float32))
    for case, spacings in (("a", [(1, 1, 1), (1, 1, 2)]), ("b", [(1, 1, 1)]), ("c", [(1, 1, 1), (1, 1, 1)])):
        for channel, spacing in enumerate(spacings):
            image.SetSpacing(spacing)
            sitk.WriteImage(image, str(tmp_path / f"{case}_{channel:04d}{ENDING}"))
    checked = check_inputs(str(tmp_path), dataset_json, plans, "2d")
    assert [c.name for c in checked.good] == ["c"]
    messages = [c.message for c in checked.refused]
    assert messages[0].startswith(f"a: its channel files differ in spacing (a_0000{ENDING}: 1x1x1, a_0001{ENDING}: "
                                  f"1x1x2): resample them onto one grid")
    assert messages[1] == f"b: channel 1 ('T2') is missing: add b_0001{ENDING}"


def test_uncompressed_nifti_cut_short_is_found_by_its_header(tmp_path):
    path = tmp_path / "case_0000.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32)), str(path))
    assert whole_file_problem(str(path)) is None
    cut(path, path.stat().st_size - 10)
    assert whole_file_problem(str(path)) == "is truncated (its header announces 832 bytes of image, it holds 822)"


def test_truncated_raw_training_image_stops_training_at_its_start(nnunet, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(nnunet["raw"], raw / nnunet["raw"].name)
    image = raw / nnunet["raw"].name / "imagesTr" / f"case_0001_0000{ENDING}"
    cut(image, image.stat().st_size // 2)
    (tmp_path / "results").mkdir()
    env = {**nnunet["env"], "nnUNet_raw": str(raw), "nnUNet_results": str(tmp_path / "results")}
    result = run(train_command(1), env, check=False)
    assert result.returncode != 0
    assert (f"1 raw training file(s) of {nnunet['raw'].name} cannot be used: {image} is truncated (its gzip stream "
            f"ends early: a copy cut short)") in result.stderr, result.stderr[-2000:]
    assert f"nnUNetv2_preprocess -d {DATASET_ID} -c 2d" in result.stderr
    assert not list((tmp_path / "results").rglob("checkpoint_*.pth"))


def test_a_cascade_stage_without_the_previous_stages_segmentations_is_refused_before_the_model_loads(tmp_path):
    """3d_cascade_fullres segments from the images and the lowres model's segmentations: without
    -prev_stage_predictions the check stops first, saying what to predict and pass (nnU-Net's predictor would fail
    per case, deep inside)."""
    from nnunet_diffusion.inference.input_checks import InputFolderError
    plans = {"configurations": {"3d_fullres": {"patch_size": [8, 8, 8]},
                                "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}
    dataset_json = {"file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    with pytest.raises(InputFolderError, match=r"3d_cascade_fullres is a cascade's second stage.*-c 3d_lowres first"
                                               r".*-prev_stage_predictions"):
        check_inputs(str(tmp_path), dataset_json, plans, "3d_cascade_fullres")
    # the first stage, and the second given the folder, pass this check (the empty folder is refused next)
    for configuration, previous in (("3d_fullres", None), ("3d_cascade_fullres", str(tmp_path))):
        with pytest.raises(InputFolderError, match="is empty"):
            check_inputs(str(tmp_path), dataset_json, plans, configuration, previous_stage_folder=previous)
