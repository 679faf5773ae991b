"""Tests of the example-dataset builder (real MNI152 template + AAL labels), at a coarse 8 mm grid for speed."""
import json
import os
from importlib.resources import files

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.planning import example_dataset
from nnunet_diffusion.planning.example_dataset import CLASSES, build_example_dataset, load_template, main

SPACING = 8.0  # coarse, yet every class is present in every case
NUM_TR, NUM_TS = 5, 2
FOREGROUND = list(CLASSES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_example_dataset(str(tmp_path_factory.mktemp("raw")), 501, "BrainAtlas", NUM_TR, NUM_TS, SPACING,
                                 seed=3)


def _cases(folder):
    """[(image path, label path)] for training and test cases."""
    out = []
    for split in ("Tr", "Ts"):
        for name in sorted(os.listdir(os.path.join(folder, f"labels{split}"))):
            out.append((os.path.join(folder, f"images{split}", name.replace(".nii.gz", "_0000.nii.gz")),
                        os.path.join(folder, f"labels{split}", name)))
    return out


def _arrays(folder):
    return [(sitk.GetArrayFromImage(sitk.ReadImage(i)), sitk.GetArrayFromImage(sitk.ReadImage(s)))
            for i, s in _cases(folder)]


def _hashable_tree(folder):
    """{relative path: file bytes} of a folder, to check that it was left untouched."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def test_layout_and_nnunet_verification(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    assert os.path.basename(dataset) == "Dataset501_BrainAtlas"
    assert len(os.listdir(os.path.join(dataset, "imagesTr"))) == NUM_TR
    assert len(os.listdir(os.path.join(dataset, "labelsTs"))) == NUM_TS
    assert sorted(os.listdir(os.path.join(dataset, "imagesTs"))) == ["case_0005_0000.nii.gz", "case_0006_0000.nii.gz"]
    verify_dataset_integrity(dataset, num_processes=1)  # raises on any problem
    assert [p for p in os.listdir(os.path.dirname(dataset)) if p.startswith(".")] == []  # no temp folders left


def test_dataset_json(dataset):
    with open(os.path.join(dataset, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "T1"}
    assert dj["labels"] == {"background": 0, **{n: i for i, n in enumerate(FOREGROUND, start=1)}}
    assert FOREGROUND == ["frontal_cortex", "parietal_occipital_cortex", "temporal_cortex", "cerebellum"]
    assert dj["numTraining"] == NUM_TR and dj["file_ending"] == ".nii.gz"
    assert set(dj["label_descriptions"]) == set(FOREGROUND)
    assert all(isinstance(t, str) and len(t) > 20 for t in dj["label_descriptions"].values())
    for key in ("description", "reference", "licence"):
        assert "AAL" in dj[key] or "Tzourio" in dj[key]
        assert "ICBM" in dj[key] or "Fonov" in dj[key]


def test_geometry_and_labels(dataset):
    for img_path, seg_path in _cases(dataset):
        img, seg = sitk.ReadImage(img_path), sitk.ReadImage(seg_path)
        assert img.GetSize() == seg.GetSize()
        assert np.allclose(img.GetSpacing(), (SPACING,) * 3) and np.allclose(seg.GetSpacing(), img.GetSpacing())
        assert np.allclose(img.GetOrigin(), seg.GetOrigin())
        assert np.allclose(img.GetDirection(), seg.GetDirection())
        assert img.GetPixelID() == sitk.sitkFloat32 and seg.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist()) == set(range(len(FOREGROUND) + 1))  # all, always
        assert max(img.GetSize()) <= 30  # cropped to the brain: ~190 mm / 8 mm plus margin


def test_deterministic_and_cases_differ(dataset, tmp_path):
    again = build_example_dataset(str(tmp_path / "raw"), 501, "BrainAtlas", NUM_TR, NUM_TS, SPACING, seed=3)
    first, second = _arrays(dataset), _arrays(again)
    for (i1, s1), (i2, s2) in zip(first, second):
        assert i1.dtype == i2.dtype and np.array_equal(i1, i2) and np.array_equal(s1, s2)
    # every pair of cases differs (in shape or in content)
    for a in range(len(first)):
        for b in range(a + 1, len(first)):
            (ia, sa), (ib, sb) = first[a], first[b]
            assert ia.shape != ib.shape or not (np.array_equal(ia, ib) or np.array_equal(sa, sb))
    other = build_example_dataset(str(tmp_path / "raw2"), 501, "BrainAtlas", 1, 1, SPACING, seed=4)
    assert not np.array_equal(_arrays(other)[0][0], first[0][0])


def test_content_is_the_real_template(dataset):
    """Images correlate with the MNI152 template (better than with a shifted copy), show real T1 contrast
    (white matter from nilearn's separate WM map > AAL cortex > background), and the AAL class volumes are
    anatomically ordered."""
    t1, _ = load_template()
    wm_path = files("nilearn").joinpath("datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    wm = sitk.ReadImage(str(wm_path), sitk.sitkFloat32)
    shifted = sitk.TranslationTransform(3, (0.0, 30.0, 0.0))
    for img_path, seg_path in _cases(dataset):
        img = sitk.ReadImage(img_path)
        x = sitk.GetArrayFromImage(img).ravel()
        seg = sitk.GetArrayFromImage(sitk.ReadImage(seg_path)).ravel()
        # The undeformed template and WM map on this case's grid (cases are deformed only by a few mm).
        tmpl = sitk.GetArrayFromImage(sitk.Resample(t1, img, sitk.Transform(), sitk.sitkLinear, 0.0)).ravel()
        tmpl_shifted = sitk.GetArrayFromImage(sitk.Resample(t1, img, shifted, sitk.sitkLinear, 0.0)).ravel()
        wm_prob = sitk.GetArrayFromImage(sitk.Resample(wm, img, sitk.Transform(), sitk.sitkLinear, 0.0)).ravel()
        corr, corr_shifted = np.corrcoef(x, tmpl)[0, 1], np.corrcoef(x, tmpl_shifted)[0, 1]
        assert corr > 0.75 and corr > corr_shifted + 0.1, (corr, corr_shifted)
        white, cortex, outside = x[wm_prob > 200].mean(), x[(seg >= 1) & (seg <= 3)].mean(), x[tmpl == 0].mean()
        assert white > cortex > 3 * outside, (white, cortex, outside)

        volume = dict(zip(FOREGROUND, np.bincount(seg, minlength=5)[1:]))
        assert min(volume, key=volume.get) == "cerebellum"
        assert max(volume, key=volume.get) == "frontal_cortex"
        assert volume["parietal_occipital_cortex"] > volume["temporal_cortex"] > volume["cerebellum"]


def test_overwrite_protection(tmp_path, monkeypatch):
    raw = str(tmp_path)
    path = build_example_dataset(raw, 7, "Tiny", 1, 1, SPACING, seed=0)
    before = _hashable_tree(path)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_example_dataset(raw, 7, "Tiny", 1, 1, SPACING, seed=1)
    with pytest.raises(FileExistsError, match="overwrite"):  # same id under another name counts too
        build_example_dataset(raw, 7, "OtherName", 1, 1, SPACING, seed=1)
    assert _hashable_tree(path) == before and sorted(os.listdir(raw)) == ["Dataset007_Tiny"]

    # A build that fails half-way (even with overwrite=True) leaves the old dataset and no temporary folder.
    def broken_case(*args, **kwargs):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(example_dataset, "make_case", broken_case)
    with pytest.raises(RuntimeError, match="simulated"):
        build_example_dataset(raw, 7, "Tiny", 1, 1, SPACING, seed=1, overwrite=True)
    assert _hashable_tree(path) == before and sorted(os.listdir(raw)) == ["Dataset007_Tiny"]
    monkeypatch.undo()

    new = build_example_dataset(raw, 7, "Renamed", 1, 1, SPACING, seed=1, overwrite=True)
    assert sorted(os.listdir(raw)) == ["Dataset007_Renamed"]  # old one gone, no temp folders left
    assert _hashable_tree(new) != before


@pytest.mark.parametrize("kwargs", [dict(dataset_id=0), dict(dataset_id=1000), dict(spacing_mm=0),
                                    dict(num_training=0), dict(num_test=0), dict(dataset_name="a/b")])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_example_dataset(str(tmp_path / "raw"), **kwargs)
    assert not (tmp_path / "raw").exists()


def test_main(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit):
        main(["-d", "9"])
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    path = main(["-d", "9", "--name", "Cli", "--num-train", "1", "--num-test", "1", "--spacing", "8"])
    assert capsys.readouterr().out.strip() == path == str(tmp_path / "Dataset009_Cli")
    with pytest.raises(SystemExit):  # exists already, without --overwrite
        main(["-d", "9", "--num-train", "1", "--num-test", "1", "--spacing", "8"])
    assert main(["-d", "9", "--num-train", "1", "--num-test", "1", "--spacing", "8", "--overwrite"]).endswith(
        "Dataset009_BrainAtlas")
