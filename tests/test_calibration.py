"""Value tests of analysis/calibration.py on toys computed by hand."""
import numpy as np
import pytest

from nnunet_diffusion.analysis.calibration import (error_detection, error_region, expected_calibration_error,
                                                   reliability_curve)


def test_perfectly_calibrated_toy_has_zero_ece():
    # bin 7: 20 voxels at 0.75, 15 right; bin 9: 20 voxels at 0.95, 19 right
    confidence = np.r_[np.full(20, 0.75), np.full(20, 0.95)]
    correct = np.r_[np.arange(20) < 15, np.arange(20) < 19]
    curve = reliability_curve(confidence, correct, bins=10)
    assert curve.count.tolist() == [0] * 7 + [20, 0, 20]
    assert curve.mean_confidence[7] == pytest.approx(0.75) and curve.accuracy[7] == pytest.approx(0.75)
    assert curve.mean_confidence[9] == pytest.approx(0.95) and curve.accuracy[9] == pytest.approx(0.95)
    assert np.isnan(curve.accuracy[:7]).all() and np.isnan(curve.mean_confidence[8])
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(0.0, abs=1e-12)


def test_over_confident_toy_ece_by_hand():
    # bin 9: confidences 0.92, 0.98, 0.92, 0.98 (mean 0.95), 2 of 4 right -> gap 0.45
    # bin 6: six at 0.65, 3 of 6 right -> gap 0.15
    # ECE = (4 * 0.45 + 6 * 0.15) / 10 = 0.27
    confidence = np.array([0.92, 0.98, 0.92, 0.98, 0.65, 0.65, 0.65, 0.65, 0.65, 0.65])
    correct = np.array([1, 0, 0, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    curve = reliability_curve(confidence, correct, bins=10)
    assert curve.count[9] == 4 and curve.count[6] == 6 and curve.count.sum() == 10
    assert curve.mean_confidence[9] == pytest.approx(0.95)
    assert curve.accuracy[9] == pytest.approx(0.5) and curve.accuracy[6] == pytest.approx(0.5)
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(0.27)
    # two bins: [0, 0.5) empty, [0.5, 1] all ten: mean conf 0.77, accuracy 0.5
    assert expected_calibration_error(confidence, correct, bins=2) == pytest.approx(0.27)
    # one bin: |0.5 - 0.77|
    assert expected_calibration_error(confidence, correct, bins=1) == pytest.approx(0.27)


def test_bin_edges_and_any_shape():
    confidence = np.array([[0.0, 0.1], [0.5, 1.0]])  # 2x2 map: flattened
    correct = np.array([[True, False], [True, True]])
    curve = reliability_curve(confidence, correct, bins=2)
    assert curve.count.tolist() == [2, 2]  # 0.0, 0.1 | 0.5, 1.0 (1.0 in the last bin)
    assert curve.accuracy.tolist() == [0.5, 1.0]
    assert curve.mean_confidence.tolist() == pytest.approx([0.05, 0.75])
    # bins: (0.05 - 0.5) and (0.75 - 1.0) -> (2 * 0.45 + 2 * 0.25) / 4 = 0.35
    assert expected_calibration_error(confidence, correct, bins=2) == pytest.approx(0.35)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        reliability_curve([0.5, 1.2], [True, False])
    with pytest.raises(ValueError):
        reliability_curve([0.5], [True, False])
    with pytest.raises(ValueError):
        expected_calibration_error([], [])


# label maps of 6 voxels: wrong at 3 (1 vs 2) and 5 (2 vs 0); voxels 0 and 1 are background in both
PREDICTED = np.array([0, 0, 1, 1, 2, 2])
REFERENCE = np.array([0, 0, 1, 2, 2, 0])


def test_errors_ranked_first_give_auroc_one_and_reversed_zero():
    uncertainty = np.array([0.0, 0.0, 0.2, 0.8, 0.3, 0.7])
    assert error_detection(uncertainty, PREDICTED, REFERENCE) == 1.0
    assert error_detection(-uncertainty, PREDICTED, REFERENCE) == 0.0
    assert error_detection(1 - uncertainty, PREDICTED, REFERENCE, region="all") == 0.0


def test_ties_count_half():
    assert error_detection(np.full(6, 0.3), PREDICTED, REFERENCE) == 0.5
    assert error_detection(np.full(6, 0.3), PREDICTED, REFERENCE, region="all") == 0.5
    # foreground: wrong {0.5, 0.9}, right {0.5, 0.2}: pairs 0.5 : 1, 0.5-0.5 tie: 1/2, 0.9 : 2 -> 3.5 / 4
    uncertainty = np.array([0.0, 0.0, 0.5, 0.5, 0.2, 0.9])
    assert error_detection(uncertainty, PREDICTED, REFERENCE) == pytest.approx(0.875)


def test_region_foreground_leaves_out_background_in_both():
    # voxel 0 (background in both, right) is the most uncertain: it counts only with region='all'
    uncertainty = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7])
    assert error_region(PREDICTED, REFERENCE).tolist() == [False, False, True, True, True, True]
    assert error_detection(uncertainty, PREDICTED, REFERENCE) == 1.0
    # all: wrong {0.8, 0.7} against right {0.9, 0.1, 0.2, 0.3}: each beats 3 of 4 -> 6 / 8
    assert error_detection(uncertainty, PREDICTED, REFERENCE, region="all") == pytest.approx(0.75)


def test_error_detection_needs_wrong_and_right_voxels():
    with pytest.raises(ValueError, match="wrong and right"):
        error_detection(np.zeros(6), REFERENCE, REFERENCE)
    with pytest.raises(ValueError, match="region"):
        error_detection(np.zeros(6), PREDICTED, REFERENCE, region="brain")
    with pytest.raises(ValueError):
        error_detection(np.zeros(5), PREDICTED, REFERENCE)
