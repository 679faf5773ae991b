"""Fusing the masks of several samples into per-class probabilities (UniSegDiff Sec. 2.4: uncertainty fusion).

STAPLE (Warfield et al. 2004) estimates each sample's sensitivity and specificity and the posterior of the true
label; we use SimpleITK's implementation (``STAPLEImageFilter``) rather than our own. It runs on the CPU on
numpy copies; the only module in ``diffusion/`` that leaves torch, because the maintained STAPLE is there.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch


def staple_probabilities(samples: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(M, *S) integer label maps of M samples -> (num_classes, *S) float32 class probabilities.

    Multi-class: one binary STAPLE per class (class c against the rest, SimpleITK's STAPLEImageFilter with
    foreground c), giving the posterior that the true label is c; the one-vs-rest posteriors need not sum to 1,
    so they are renormalised over classes (our choice: the paper fuses binary lesion masks only). A class that
    every sample gives the same mask (e.g. absent everywhere) keeps that mask as its probability: STAPLE has
    nothing to estimate there. A voxel whose posteriors are all 0 gets the samples' vote shares.
    """
    labels = samples.detach().cpu().numpy().astype(np.uint8 if num_classes < 256 else np.uint16)
    images = [sitk.GetImageFromArray(label) for label in labels]
    posteriors = np.zeros((num_classes, *labels.shape[1:]), dtype=np.float64)
    for c in range(num_classes):
        masks = labels == c
        if (masks == masks[0]).all():
            posteriors[c] = masks[0]
            continue
        staple = sitk.STAPLEImageFilter()
        staple.SetForegroundValue(float(c))
        posteriors[c] = sitk.GetArrayFromImage(staple.Execute(images))
    total = posteriors.sum(axis=0, keepdims=True)
    votes = np.stack([(labels == c).mean(axis=0) for c in range(num_classes)])
    fused = np.where(total > 0, posteriors / np.where(total > 0, total, 1), votes)
    return torch.from_numpy(fused.astype(np.float32)).to(samples.device)
