"""Out-of-distribution localisation metrics of an anomaly map (DSM sec. 5.2): AUROC and FPR95 over voxels."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the voxels where ``positive``: the probability that a random
    positive voxel scores above a random negative one (ties count half; Mann-Whitney U with average ranks)."""
    scores, positive = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs positive and negative voxels")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold that finds at least ``tpr`` of the positive voxels (FPR95)."""
    scores, positive = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positive, dtype=bool).ravel()
    ordered = np.sort(scores[positive])[::-1]
    threshold = ordered[int(np.ceil(tpr * len(ordered))) - 1]  # the k-th highest positive score, k = ceil(tpr * P)
    return float((scores[~positive] >= threshold).mean())
