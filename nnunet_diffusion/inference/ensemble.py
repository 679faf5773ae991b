"""Test-time ensembles of one window: mirrored copies stacked into one batch, and what their members say.

Pure tensor functions (no network, no nnU-Net): the predictor stacks a window's mirrored copies with
``stack_mirrored``, runs them as one batch, undoes the flips with ``unflip`` and measures the spread of the
members (samples x copies) with ``uncertainty_maps``.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch

# the maps ``uncertainty_maps`` returns, in channel order, and the file suffix each is written under
UNCERTAINTY_MAPS = ("uncertainty", "mutual_information")


def mirror_combinations(mirror_axes: Optional[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Spatial mirror axes (0-based, nnU-Net's ``allowed_mirroring_axes``) -> the tensor axes to flip for each copy
    of a (B, C, *S) batch: the unflipped copy () first, then every non-empty combination in nnU-Net's order."""
    axes = [a + 2 for a in (mirror_axes or ())]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def stack_mirrored(x: torch.Tensor, combinations: Sequence[Tuple[int, ...]]) -> torch.Tensor:
    """(B, C, *S) -> (K * B, C, *S): the K mirrored copies, copy-major."""
    return torch.cat([torch.flip(x, c) if c else x for c in combinations])


def unflip(y: torch.Tensor, combinations: Sequence[Tuple[int, ...]], extra_dims: int = 0) -> torch.Tensor:
    """(K, [extra dims,] C, *S) outputs of the K copies -> the same with every copy flipped back. ``extra_dims``:
    dimensions between the copy and the class axis (e.g. samples), which shift the flipped axes."""
    return torch.stack([torch.flip(y[k], [a - 1 + extra_dims for a in c]) if c else y[k]
                        for k, c in enumerate(combinations)])


def entropy(p: torch.Tensor, class_dim: int) -> torch.Tensor:
    """Shannon entropy in nats over ``class_dim`` (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=class_dim)


def uncertainty_maps(members: torch.Tensor) -> torch.Tensor:
    """(M, C, *S) class probabilities of M members -> (2, *S) float32 maps, in nats:

    0 'uncertainty': predictive entropy H[mean_m p_m], the total uncertainty of the averaged prediction (0 where
      every member is certain of one class, up to log C);
    1 'mutual_information': H[mean_m p_m] - mean_m H[p_m] (BALD), the part that comes from members disagreeing:
      0 where all members give the same distribution, high where confident members name different classes.
    """
    p = members.float()
    total = entropy(p.mean(dim=0), class_dim=0)
    expected = entropy(p, class_dim=1).mean(dim=0)
    return torch.stack([total, (total - expected).clamp_min(0)])
