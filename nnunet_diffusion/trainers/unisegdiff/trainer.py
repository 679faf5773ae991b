"""nnUNetTrainerUniSegDiff: staged diffusion with a frozen, segmentation-pre-trained condition network, dual
decoders, DCA and STAPLE fusion of 20 samples (UniSegDiff: "UniSegDiff: Boosting Unified Lesion Segmentation via
a Staged Diffusion Model", MICCAI; reference code https://github.com/HUYILONG-Z/UniSegDiff).

The condition network (CFENet) is nnU-Net's own U-Net for the plans. Where it comes from, in this order:
  1. NNUNET_DIFFUSION_CONDITION_CHECKPOINT=<file>: that stock nnU-Net checkpoint (an error if it is missing);
  2. the stock nnUNetTrainer's checkpoint_final.pth of the same dataset, plans, configuration and fold in
     nnUNet_results (what nnU-Net users already have);
  3. otherwise this trainer pre-trains it as a first phase (``condition_pretrain_fraction`` of the training:
     epochs, or the time budget), with nnU-Net's Dice + CE, then freezes it.
The log says which. Its weights are part of this trainer's checkpoint: prediction needs nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from nnunet_diffusion.architectures.segmenter import TrainingPass
from nnunet_diffusion.architectures.unisegdiff.dnet import UniSegDiffDenoiser
from nnunet_diffusion.architectures.unisegdiff.options import UniSegDiffOptions
from nnunet_diffusion.architectures.unisegdiff.segmenter import StagedDiffusionSegmenter
from nnunet_diffusion.diffusion.masks import x0_from_logits
from nnunet_diffusion.diffusion.samplers import STAGED, SamplerSettings
from nnunet_diffusion.settings import read as read_setting
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
from nnunet_diffusion.trainers.common.pretraining_phase import PretrainingPhaseMixin
from nnunet_diffusion.trainers.common.pretrained_condition import (load_frozen_condition_network, read_condition_checkpoint,
                                                            stock_checkpoint_path)

ENV_CONDITION_CHECKPOINT = "NNUNET_DIFFUSION_CONDITION_CHECKPOINT"


class nnUNetTrainerUniSegDiff(PretrainingPhaseMixin, nnUNetTrainerDiffusionBase):
    """The full model: staged training (thresholds 599 / 299, alpha:beta 1:3, 1:1, 3:1), pre-trained frozen CFENet,
    DCA, staged inference (12 network calls) and STAPLE fusion of 20 masks. Ablations: variants_unisegdiff.py."""

    extra_settings_keys = (*nnUNetTrainerDiffusionBase.extra_settings_keys, "condition_source")  # where the condition network came from (written at start)

    noise_schedule = "linear"
    num_train_timesteps = 1000
    prediction = "x0"  # the uniform ablations' head; the staged model trains both heads
    options = UniSegDiffOptions()  # staged targets, heads, DCA, condition network, last jump: options.py
    condition_trainer = "nnUNetTrainer"  # whose checkpoint in nnUNet_results is the pre-trained CFENet
    # share of training spent pre-training CFENet when no stock checkpoint exists: our choice (the paper pre-trains
    # it separately); 0.3 gave CFENet time to segment while leaving most of the run to DNet
    condition_pretrain_fraction = 0.3
    default_sampler = SamplerSettings(kind=STAGED, steps=10, num_samples=20, fusion="staple")
    # the decoders recompute their activations in backward when training on CUDA (the base's
    # ``activation_checkpointing``): without it, peak training memory at nnU-Net's plan for a lesion CT
    # (24 x 256 x 256, batch 2) was 1.68x the stock trainer's on an H100 (benchmarks/gpu/memory_gpu.md)

    # ---- settings stored with the model ---------------------------------------------------------------------

    @classmethod
    def diffusion_settings(cls) -> dict:
        return {**super().diffusion_settings(), **cls.options.to_stored()}

    # ---- network --------------------------------------------------------------------------------------------

    @classmethod
    def build_denoiser(cls, configuration_manager, num_input_channels: int, num_classes: int,
                       stored: dict) -> nn.Module:
        options = UniSegDiffOptions.from_stored(stored)
        return UniSegDiffDenoiser(num_input_channels, num_classes, **cls.plans_unet_kwargs(configuration_manager),
                                  heads=options.heads, condition=options.condition_network, use_dca=options.dca,
                                  patch_size=configuration_manager.patch_size, max_tokens=options.dca_max_tokens)

    @classmethod
    def build_segmenter(cls, denoiser, schedule, sampler, stored: dict) -> nn.Module:
        options = UniSegDiffOptions.from_stored(stored)
        if options.staged is None:
            return super().build_segmenter(denoiser, schedule, sampler, stored)
        return StagedDiffusionSegmenter(denoiser, schedule, sampler, options.staged, options.last_jump_head)

    # ---- where the condition network comes from -------------------------------------------------------------

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # decided (and a named checkpoint read and checked) before nnU-Net makes any folder
        self.condition_checkpoint, self._condition_weights = self._find_condition_checkpoint(plans, configuration, fold)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.condition_source = self._describe_condition_source()
        self.plans_manager.plans["configurations"][configuration]["diffusion"]["condition_source"] = \
            self.condition_source

    def _find_condition_checkpoint(self, plans: dict, configuration: str, fold):
        if self.options.condition_network != "pretrained":
            return None, None
        results = os.environ.get("nnUNet_results")  # read now (nnunetv2.paths reads it once, at import)
        explicit = read_setting(ENV_CONDITION_CHECKPOINT) or ""
        if explicit:
            path = Path(explicit)
        elif results:
            path = stock_checkpoint_path(results, plans["dataset_name"], plans["plans_name"], configuration,
                                         fold, self.condition_trainer)
        else:
            return None, None
        if not explicit and not path.is_file():
            return None, None  # no stock model: pre-train CFENet in this run
        try:
            weights = read_condition_checkpoint(path, plans["dataset_name"], plans["plans_name"], configuration, fold)
        except ValueError as error:
            source = f"{ENV_CONDITION_CHECKPOINT}={explicit}" if explicit else "the stock model in nnUNet_results"
            raise ValueError(f"{self.__class__.__name__}: {source}: {error}") from None
        return path, weights

    def _describe_condition_source(self) -> str:
        if self.options.condition_network == "joint":
            return "an encoder trained jointly with DNet (no pre-training)"
        if self.condition_checkpoint is not None:
            return f"stock nnU-Net checkpoint {self.condition_checkpoint}, frozen"
        return (f"pre-trained in this run for the first {self.condition_pretrain_fraction:.0%} of training "
                f"(nnU-Net's Dice + CE), then frozen")

    def initialize(self):
        super().initialize()
        if self._condition_weights is not None:
            denoiser = self._network().denoiser
            load_frozen_condition_network(denoiser.cfenet, self.condition_checkpoint, self.plans_manager.dataset_name,
                                          self.plans_manager.plans_name, self.configuration_name, self.fold,
                                          weights=self._condition_weights)
            self._condition_weights = None  # the network holds them now

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"Condition network (CFENet): {self.condition_source}.")

    # ---- the pre-training phase of CFENet (PretrainingPhaseMixin) -------------------------------------------

    pretrained_part_name = "CFENet"

    def pretrained_part(self) -> nn.Module:
        return self._network().denoiser.cfenet

    def pretraining(self) -> bool:
        """Whether this step pre-trains CFENet (no stock checkpoint, first share of training)."""
        return (self.options.condition_network == "pretrained" and self.condition_checkpoint is None
                and self.training_progress() < self.condition_pretrain_fraction)

    # ---- one training draw ----------------------------------------------------------------------------------

    def pretraining_loss(self, cfenet: nn.Module, image: torch.Tensor, target: torch.Tensor):
        """CFENet segmenting the image as a stock nnU-Net would (Dice + CE)."""
        with self._autocast():
            logits = cfenet(image)
            loss = self.loss(logits, target)
        return loss, TrainingPass(logits, None, x0_from_logits(logits)), target
