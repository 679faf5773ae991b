"""Every trainer of the package stands on the package base, with its mixins in the order the guarantees need:
fault safety outermost (its out-of-memory message and atomic checkpoints wrap the budgeted training loop), then the
run-length mixin, then nnU-Net's trainer; method mixins (class text, pre-training phase) before the base."""
import inspect

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunet_diffusion.nnunet_ext.nnunet_diffusion_trainers as registry
from nnunet_diffusion.trainers.common.budget import (TrainingBudgetMixin, nnUNetTrainerBudget,
                                                     nnUNetTrainerBudgetAdam1en3,
                                                     nnUNetTrainerBudgetAdam1en3NoDeepSupervision)
from nnunet_diffusion.trainers.common.class_text import ClassTextMixin
from nnunet_diffusion.trainers.common.fault_safety import FaultSafetyMixin
from nnunet_diffusion.trainers.common.package_base import nnUNetTrainerPackageBase
from nnunet_diffusion.trainers.common.pretraining_phase import PretrainingPhaseMixin

STOCK_ANCHORS = {nnUNetTrainerBudget, nnUNetTrainerBudgetAdam1en3,
                 nnUNetTrainerBudgetAdam1en3NoDeepSupervision}  # the stock trainers of the benchmarks
TRAINERS = sorted({obj for _, obj in inspect.getmembers(registry, inspect.isclass)
                   if issubclass(obj, nnUNetTrainer) and obj not in STOCK_ANCHORS}, key=lambda c: c.__name__)


def test_the_registry_holds_every_method():
    names = {c.__name__ for c in TRAINERS}
    assert {"nnUNetTrainerCrossTimestep", "nnUNetTrainerUniSegDiff", "nnUNetTrainerTextDiffSeg", "nnUNetTrainerDSM",
            "nnUNetTrainerDSMStage2", "nnUNetTrainerDiffSegRecycling"} <= names
    assert len(TRAINERS) > 40  # the variants too


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda c: c.__name__)
def test_mixins_stand_in_the_order_the_guarantees_need(trainer):
    mro = trainer.__mro__
    assert issubclass(trainer, nnUNetTrainerPackageBase)
    position = {cls: mro.index(cls) for cls in (FaultSafetyMixin, TrainingBudgetMixin, nnUNetTrainer,
                                                nnUNetTrainerPackageBase)}
    assert position[FaultSafetyMixin] < position[TrainingBudgetMixin] < position[nnUNetTrainer]
    for mixin in (ClassTextMixin, PretrainingPhaseMixin):
        if mixin in mro:
            assert mro.index(mixin) < position[nnUNetTrainerPackageBase], f"{mixin.__name__} after the base"
    # the budgeted loop is FaultSafetyMixin's to wrap: nothing between them redefines it
    assert trainer.run_training is FaultSafetyMixin.run_training
    # the package base's abstract hooks are defined (its NotImplementedError is never what a trainer runs)
    for hook in ("model_settings", "training_loss", "validation_scores"):
        assert getattr(trainer, hook) is not getattr(nnUNetTrainerPackageBase, hook), hook
    if issubclass(trainer, PretrainingPhaseMixin):
        for hook in ("pretrained_part", "pretraining", "pretraining_loss"):
            assert getattr(trainer, hook) is not getattr(PretrainingPhaseMixin, hook), hook


@pytest.mark.parametrize("anchor", sorted(STOCK_ANCHORS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_stock_anchors_are_the_stock_trainers_plus_the_run_lengths(anchor):
    assert anchor.__mro__[1] is TrainingBudgetMixin and not issubclass(anchor, nnUNetTrainerPackageBase)
