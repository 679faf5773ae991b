"""A PNG for people: a few slices of image, ground truth and prediction of some cases, side by side.

    nnunet-diffusion slices-figure -i imagesTs -g labelsTs -p predictions -o slices.png [--cases 2]

Rows: cases; columns: for each of three axial slices (25%, 50%, 75% through the labelled extent) the image,
the image with the ground truth and the image with the prediction overlaid (one colour per class).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _slices(labels: np.ndarray, count: int = 3) -> list[int]:
    """Axial (first numpy axis) slice indices spread over the labelled extent. labels: (Z, Y, X)."""
    z = np.nonzero(labels.any(axis=(1, 2)))[0]
    if z.size == 0:
        z = np.arange(labels.shape[0])
    return [int(z[0] + (z[-1] - z[0]) * q) for q in np.linspace(0.25, 0.75, count)]


def write_slices_figure(images: str, labels: str, predictions: str, out_png: str, num_cases: int = 2,
                        file_ending: str = ".nii.gz") -> str:
    """Write the figure for the first ``num_cases`` predicted cases (sorted names); returns its path."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    cases = sorted(p.name[: -len(file_ending)] for p in Path(predictions).glob(f"*{file_ending}"))[:num_cases]
    if not cases:
        raise FileNotFoundError(f"no *{file_ending} predictions in {predictions}")
    fig, axes = plt.subplots(len(cases), 9, figsize=(18, 2.3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        image = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(images, f"{case}_0000{file_ending}")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels, f"{case}{file_ending}")))
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(predictions, f"{case}{file_ending}")))
        num_classes = int(max(truth.max(), prediction.max(), 1))
        for k, z in enumerate(_slices(truth)):
            for j, (title, overlay) in enumerate([("image", None), ("ground truth", truth),
                                                   ("prediction", prediction)]):
                ax = row[3 * k + j]
                ax.imshow(image[z], cmap="gray")
                if overlay is not None:
                    ax.imshow(np.ma.masked_equal(overlay[z], 0), cmap="tab10", vmin=1, vmax=max(num_classes, 10),
                              alpha=0.5, interpolation="nearest")
                ax.set_title(f"{case} z={z} {title}", fontsize=7)
                ax.axis("off")
    fig.tight_layout()
    tmp = f"{out_png}.tmp.png"  # written under a temporary name, then renamed: never a half-written figure
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--images", required=True, help="folder of images (case_0000.nii.gz)")
    p.add_argument("-g", "--labels", required=True, help="folder of ground-truth segmentations")
    p.add_argument("-p", "--predictions", required=True, help="folder of predicted segmentations")
    p.add_argument("-o", "--out", required=True, help="PNG to write")
    p.add_argument("--cases", type=int, default=2)
    args = p.parse_args(argv)
    path = write_slices_figure(args.images, args.labels, args.predictions, args.out, args.cases)
    print(path)
    return path
