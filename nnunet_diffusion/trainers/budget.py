"""Short, budgeted training runs for any nnU-Net trainer, set from the environment.

nnU-Net's schedule (1000 epochs x 250 iterations) is far beyond a CPU demo, a test or an equal-time benchmark.
These variables shorten it without new trainer classes; unset, nothing changes:

    NNUNET_DIFFUSION_EPOCHS          number of epochs
    NNUNET_DIFFUSION_ITERATIONS      training iterations per epoch
    NNUNET_DIFFUSION_VAL_ITERATIONS  per-epoch validation iterations
    NNUNET_DIFFUSION_TIME_BUDGET     wall-clock seconds of training; the run stops after the iteration that
                                     exceeds it, then validates, saves checkpoint_final and runs the final
                                     validation as usual
"""
from __future__ import annotations

import os
from time import perf_counter

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

ENV_INT_SETTINGS = {"NNUNET_DIFFUSION_EPOCHS": "num_epochs",
                    "NNUNET_DIFFUSION_ITERATIONS": "num_iterations_per_epoch",
                    "NNUNET_DIFFUSION_VAL_ITERATIONS": "num_val_iterations_per_epoch"}
ENV_TIME_BUDGET = "NNUNET_DIFFUSION_TIME_BUDGET"


def _read_env(name: str, cast):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a number.") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be > 0.")
    return value


class TrainingBudgetMixin:
    """Mix into an nnUNetTrainer (before it in the bases) to honour the NNUNET_DIFFUSION_* run lengths."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for env_name, attribute in ENV_INT_SETTINGS.items():
            value = _read_env(env_name, int)
            if value is not None:
                setattr(self, attribute, value)
        self.time_budget_s = _read_env(ENV_TIME_BUDGET, float)
        if self.time_budget_s is not None:
            self.save_every = 1  # a budgeted run may end at any epoch: keep checkpoint_latest current

    def _out_of_time(self, started: float) -> bool:
        return self.time_budget_s is not None and perf_counter() - started > self.time_budget_s

    def run_training(self):
        """nnU-Net's loop (nnUNetTrainer.run_training) with a wall-clock stop; same hooks, same order."""
        if self.time_budget_s is None:
            return super().run_training()
        self.on_train_start()
        started = perf_counter()
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                if self._out_of_time(started):
                    break
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            if self._out_of_time(started):
                self.print_to_log_file(f"Time budget of {self.time_budget_s:.0f} s reached: stopping.")
                break
        self.on_train_end()


class nnUNetTrainerBudget(TrainingBudgetMixin, nnUNetTrainer):
    """The stock nnUNetTrainer, unchanged but for the NNUNET_DIFFUSION_* run lengths (benchmarks, demos)."""
