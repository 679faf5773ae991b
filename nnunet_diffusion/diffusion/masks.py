"""Segmentation masks as diffusion data: one-hot labels scaled to [-1, 1], and back to probabilities."""
from __future__ import annotations

import torch


def labels_to_x0(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, *S) integer label map -> (B, num_classes, *S) one-hot (background included) * 2 - 1."""
    if labels.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, *S) label map, got shape {tuple(labels.shape)}")
    onehot = torch.zeros((labels.shape[0], num_classes, *labels.shape[2:]), device=labels.device)
    onehot.scatter_(1, labels.long(), 1.0)
    return onehot * 2 - 1


def x0_from_logits(logits: torch.Tensor, class_dim: int = 1) -> torch.Tensor:
    """Mask estimate of an x0-predicting network: softmax(logits) * 2 - 1 (recycling paper)."""
    return torch.softmax(logits.float(), dim=class_dim) * 2 - 1


def probabilities_from_x0(x0: torch.Tensor, class_dim: int = 1, floor: float = 1e-6) -> torch.Tensor:
    """Mask estimate in [-1, 1] -> class probabilities: clamp((x0 + 1) / 2) renormalised over classes.

    For x0 = softmax(l) * 2 - 1 this returns softmax(l) exactly (up to ``floor``); a voxel whose channels are
    all -1 becomes uniform.
    """
    p = ((x0.float() + 1) / 2).clamp_min(floor)
    return p / p.sum(dim=class_dim, keepdim=True)
