"""A first training phase that trains one part of the network alone, then freezes it (UniSegDiff's CFENet,
TextDiffSeg's label autoencoder when pre-trained).

The part is frozen when the network is built, so the DDP wrapper of the whole network never registers it and
no registered parameter goes without a gradient in any step. During the phase the part gets its own wrapper
(DDP under DDP); at the end of the phase it is frozen again and the rest trains through nnU-Net's wrapper.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class PretrainingPhaseMixin:
    """For nnUNetTrainer subclasses. Subclasses say what the part is (``pretrained_part``), whether this step
    belongs to the phase (``pretraining``) and how a phase step computes its loss (``pretraining_loss``)."""

    pretrained_part_name = "the pre-trained part"
    _pretraining_wrapper: Optional[nn.Module] = None

    def pretrained_part(self) -> nn.Module:
        raise NotImplementedError  # abstract: every trainer using the mixin defines it

    def pretraining(self) -> bool:
        raise NotImplementedError  # abstract: every trainer using the mixin defines it

    def pretraining_loss(self, part: nn.Module, image: torch.Tensor, target: torch.Tensor):
        """(loss, a pass whose ``x0_hat`` the per-epoch validation scores, target) of a phase step: ``part`` (the
        pre-trained part, in its training wrapper) on image (B, C, *S) / target (B, 1, *S) labels."""
        raise NotImplementedError  # abstract: every trainer using the mixin defines it

    def training_loss(self, batch: dict):
        """The phase's loss while ``pretraining()``, else the trainer's own."""
        if not self.pretraining():
            return super().training_loss(batch)
        image, target = self._batch_on_device(batch)
        part = self._part_for_pretraining() if torch.is_grad_enabled() else self.pretrained_part()
        return self.pretraining_loss(part, image, target)

    def _part_for_pretraining(self) -> nn.Module:
        """The part with its parameters trainable, in its own DDP wrapper under DDP."""
        part = self.pretrained_part()
        if self._pretraining_wrapper is None:
            for parameter in part.parameters():
                parameter.requires_grad_(True)
            self._pretraining_wrapper = part
            if self.is_ddp:
                self._pretraining_wrapper = DistributedDataParallel(
                    part, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        return self._pretraining_wrapper

    def _end_pretraining(self) -> None:
        if self._pretraining_wrapper is None:
            return
        for parameter in self.pretrained_part().parameters():
            parameter.requires_grad_(False)
        self._pretraining_wrapper = None
        self.print_to_log_file(f"Pre-training of {self.pretrained_part_name} done at epoch {self.current_epoch} "
                               f"({self.training_progress():.0%} of training): frozen, the rest trains from now on.")

    def train_step(self, batch: dict) -> dict:
        if not self.pretraining():
            self._end_pretraining()
        return super().train_step(batch)
