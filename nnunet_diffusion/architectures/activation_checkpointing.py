"""Activation checkpointing for training: recompute a block's activations in the backward pass instead of
keeping them, trading about one extra forward of that block for its activation memory."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(module: nn.Module, enabled: bool, function, *args):
    """``function(*args)``; recomputed in backward when ``enabled`` and ``module`` trains with gradients on.

    ``function`` must be pure (the same outputs for the same inputs, no state written outside its outputs):
    it runs again during backward. Non-reentrant checkpointing (``use_reentrant=False``) takes any arguments and
    nested outputs and works under DDP and autocast. Evaluation and sampling run plainly.
    """
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)
