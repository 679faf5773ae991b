"""Whether predicted probabilities and uncertainty maps can be trusted, voxel by voxel: pure numpy.

- ``reliability_curve``: confidence (e.g. the max class probability) against accuracy, in equal-width bins;
- ``expected_calibration_error``: the count-weighted gap |accuracy - confidence| over those bins (ECE);
- ``error_detection``: how well an uncertainty map finds the wrong voxels of a segmentation (AUROC, with
  ``ood_metrics.auroc``).

Every function takes arrays of any shape (they are flattened), e.g. (*S) maps of one case or the voxels of many
cases concatenated.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nnunet_diffusion.analysis.ood_metrics import auroc

REGIONS = ("foreground", "all")


class ReliabilityCurve(NamedTuple):
    """Per bin, each of shape (bins,): the mean confidence and the accuracy of the voxels in the bin (NaN where the
    bin is empty) and how many voxels fell into it. Bin k holds k / bins <= confidence < (k + 1) / bins (1.0 in
    the last)."""
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_curve(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> ReliabilityCurve:
    """Reliability curve of ``confidence`` (any shape, values in [0, 1]) against ``correct`` (same shape, bool: the
    prediction the confidence belongs to was right) in ``bins`` equal-width bins on [0, 1].

    Returns a ``ReliabilityCurve`` (mean confidence, accuracy, count), three arrays of shape (bins,)."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence has {confidence.size} values, correct {correct.size}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if confidence.size and (np.isnan(confidence).any() or confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("confidence must lie in [0, 1] (probabilities)")
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=bins) / count
    return ReliabilityCurve(mean_confidence, accuracy, count)


def calibration_error_of_curve(curve: ReliabilityCurve) -> float:
    """ECE of a reliability curve: sum over bins of count * |accuracy - mean confidence|, over the total count."""
    count = np.asarray(curve.count, dtype=np.float64)
    if count.sum() == 0:
        raise ValueError("ECE needs at least one voxel")
    filled = count > 0
    gap = np.abs(np.asarray(curve.accuracy)[filled] - np.asarray(curve.mean_confidence)[filled])
    return float((count[filled] * gap).sum() / count.sum())


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of ``confidence`` (any shape, in [0, 1]) against ``correct`` (same shape, bool):
    the count-weighted mean over ``bins`` equal-width bins of |accuracy - mean confidence| (0: calibrated)."""
    return calibration_error_of_curve(reliability_curve(confidence, correct, bins))


def error_region(predicted: np.ndarray, reference: np.ndarray, region: str = "foreground",
                 background: int = 0) -> np.ndarray:
    """Bool mask (shape of ``predicted``) of the voxels ``error_detection`` scores: 'foreground' where the
    prediction or the reference is not ``background``, 'all' everywhere."""
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    if predicted.shape != reference.shape:
        raise ValueError(f"predicted {predicted.shape} and reference {reference.shape} differ in shape")
    if region == "all":
        return np.ones(predicted.shape, dtype=bool)
    if region == "foreground":
        return (predicted != background) | (reference != background)
    raise ValueError(f"region must be one of {REGIONS}, got {region!r}")


def error_detection(uncertainty: np.ndarray, predicted: np.ndarray, reference: np.ndarray,
                    region: str = "foreground", background: int = 0) -> float:
    """AUROC of ``uncertainty`` as a detector of the wrong voxels (``predicted != reference``).

    uncertainty, predicted (label map), reference (label map): arrays of one shape (e.g. (*S), or the voxels of
    several cases concatenated). region: 'foreground' scores only the voxels where the prediction or the reference
    is foreground (the background far from any structure is trivially right and would inflate the AUROC), 'all'
    every voxel. 1.0: every wrong voxel is more uncertain than every right one; 0.5: no better than chance (ties
    count half). ValueError if the region has no wrong or no right voxel (the AUROC is undefined)."""
    uncertainty = np.asarray(uncertainty)
    mask = error_region(predicted, reference, region, background)
    if uncertainty.shape != mask.shape:
        raise ValueError(f"uncertainty {uncertainty.shape} and the label maps {mask.shape} differ in shape")
    wrong = np.asarray(predicted)[mask] != np.asarray(reference)[mask]
    if not wrong.any() or wrong.all():
        raise ValueError(f"error detection needs wrong and right voxels in the {region!r} region "
                         f"({int(wrong.sum())} of {wrong.size} are wrong)")
    return auroc(uncertainty[mask], wrong)
