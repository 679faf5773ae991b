"""Anomaly mask visual prompt (DSM sec. 4.2.1, eqs. 14-15).

The organ queries' responses at a voxel are all low where the voxel belongs to none of the organs seen in
training: score = -max_k response_k (eq. 14), min-max normalised per case to [0, 1]; the prompt marks the voxels
with normalised score > 0.5 (eq. 15). The tumour queries' attention uses it as an additive bias, as DSM's reference
code does: ``PROMPT_WEIGHT * score`` inside the prompt, ``OUTSIDE_BIAS`` elsewhere (a soft mask, not -inf, so a
query whose prompt is empty still attends somewhere).

Background: the paper has "25 organ queries (...) for 25 organs" and no background query. Ours keep one query for
nnU-Net's background (label 0): it gives the segmentation its label-0 channel and the k-means assignment a cluster
for the unlabelled voxels. It is trained to claim every unlabelled voxel, an unseen organ's included, so eq. 14's
max leaves it out (``organ_queries``): the score is the negative max over the organ queries only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

THRESHOLD = 0.5
PROMPT_WEIGHT = 0.2
OUTSIDE_BIAS = -1.0
BACKGROUND = 0  # nnU-Net's background label


def organ_queries(query_classes: Sequence[int]) -> list:
    """The positions of the queries that stand for an organ, i.e. all but the background's (label 0)."""
    return [k for k, c in enumerate(query_classes) if c != BACKGROUND]


def anomaly_score(responses: torch.Tensor, queries: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, K, *S) query responses (logits) -> (B, *S) anomaly score in [0, 1]: -max over the queries ``queries``
    (positions along K; None: all K), min-max normalised per case (a constant map gives 0, and so does an empty
    ``queries``: no organ query, nothing to call anomalous)."""
    if queries is not None:
        if len(queries) == 0:
            return responses.new_zeros((responses.shape[0], *responses.shape[2:]), dtype=torch.float32)
        responses = responses[:, list(queries)]
    score = -responses.float().amax(dim=1)
    flat = score.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1, *[1] * (score.ndim - 1))
    return (score - low.view(shape)) / (high - low).clamp_min(1e-8).view(shape)


def anomaly_prompt(score: torch.Tensor) -> torch.Tensor:
    """(B, *S) normalised score -> (B, *S) bool: the voxels the prompt marks as anomalous (eq. 15)."""
    return score > THRESHOLD


def prompt_attention_bias(score: torch.Tensor) -> torch.Tensor:
    """(B, *S) normalised score -> (B, P) additive attention bias over the P voxels for the tumour queries."""
    flat = score.flatten(1)
    return torch.where(flat > THRESHOLD, PROMPT_WEIGHT * flat, torch.full_like(flat, OUTSIDE_BIAS))
