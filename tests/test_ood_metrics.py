"""AUROC and FPR95 by hand."""
import numpy as np
import pytest

from nnunet_diffusion.analysis.ood_metrics import auroc, fpr_at_tpr


def test_auroc_by_hand():
    scores = np.array([0.9, 0.8, 0.4, 0.4, 0.1])
    positive = np.array([True, False, True, False, False])
    # positive pairs (pos, neg): 0.9 beats all 3; 0.4 beats 0.1, ties 0.4 (half), loses to 0.8 -> (3 + 1.5) / 6
    assert auroc(scores, positive) == pytest.approx(4.5 / 6)
    assert auroc(np.array([1, 2, 3]), np.array([False, True, True])) == 1.0
    with pytest.raises(ValueError):
        auroc(scores, np.zeros(5, dtype=bool))


def test_fpr95_by_hand():
    scores = np.concatenate([np.linspace(1, 2, 20), np.linspace(0, 1.5, 16)])
    positive = np.concatenate([np.ones(20, dtype=bool), np.zeros(16, dtype=bool)])
    # 95% of 20 positives = 19: threshold = the 19th highest positive = 1 + 1/19; negatives >= it: 1.1, 1.2, .., 1.5
    threshold = 1 + 1 / 19
    assert fpr_at_tpr(scores, positive) == pytest.approx(np.mean(np.linspace(0, 1.5, 16) >= threshold))
    assert fpr_at_tpr(np.array([1.0, 0.0]), np.array([True, False])) == 0.0
