"""Anomaly mask visual prompt (DSM sec. 4.2.1, eqs. 14-15).

The organ queries' responses at a voxel are all low where the voxel belongs to none of the classes seen in
training: score = -max_k response_k (eq. 14), min-max normalised per case to [0, 1]; the prompt marks the voxels
with normalised score > 0.5 (eq. 15). The tumour queries' attention uses it as an additive bias, as DSM's reference
code does: ``PROMPT_WEIGHT * score`` inside the prompt, ``OUTSIDE_BIAS`` elsewhere (a soft mask, not -inf, so a
query whose prompt is empty still attends somewhere).
"""
from __future__ import annotations

import torch

THRESHOLD = 0.5
PROMPT_WEIGHT = 0.2
OUTSIDE_BIAS = -1.0


def anomaly_score(responses: torch.Tensor) -> torch.Tensor:
    """(B, K, *S) organ query responses (logits) -> (B, *S) anomaly score in [0, 1]: -max over queries, min-max
    normalised per case (a constant map gives 0)."""
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
