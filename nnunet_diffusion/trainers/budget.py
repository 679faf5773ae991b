"""Short, budgeted training runs for any nnU-Net trainer, set from the environment.

nnU-Net's schedule (1000 epochs x 250 iterations) is far beyond a CPU demo, a test or an equal-time benchmark.
These variables shorten it without new trainer classes; unset, nothing changes:

    NNUNET_DIFFUSION_EPOCHS          number of epochs
    NNUNET_DIFFUSION_ITERATIONS      training iterations per epoch
    NNUNET_DIFFUSION_VAL_ITERATIONS  per-epoch validation iterations
    NNUNET_DIFFUSION_TIME_BUDGET     wall-clock seconds of training; the run stops after the iteration that
                                     exceeds it, then validates, saves checkpoint_final and runs the final
                                     validation as usual
    NNUNET_DIFFUSION_FINAL_VALIDATION=0  skip the final validation of the fold (with a sampler inside and
                                     mirroring on, it can cost more than a short training run)

Every run writes fold_X/training_time.json: iterations and wall-clock seconds of the training iterations
(data loading included, per-epoch validation excluded).
"""
from __future__ import annotations

import json
import os
from os.path import join
from time import perf_counter

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

ENV_INT_SETTINGS = {"NNUNET_DIFFUSION_EPOCHS": "num_epochs",
                    "NNUNET_DIFFUSION_ITERATIONS": "num_iterations_per_epoch",
                    "NNUNET_DIFFUSION_VAL_ITERATIONS": "num_val_iterations_per_epoch"}
ENV_TIME_BUDGET = "NNUNET_DIFFUSION_TIME_BUDGET"
ENV_FINAL_VALIDATION = "NNUNET_DIFFUSION_FINAL_VALIDATION"


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

    # the explicit signature matters: nnUNetTrainer stores its init args by inspecting it (for checkpoints)
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # read (and validate) before nnUNetTrainer makes the output folder
        lengths = {attribute: _read_env(name, int) for name, attribute in ENV_INT_SETTINGS.items()}
        time_budget_s = _read_env(ENV_TIME_BUDGET, float)
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, value in lengths.items():
            if value is not None:
                setattr(self, attribute, value)
        self.time_budget_s = time_budget_s
        if self.time_budget_s is not None:
            self.save_every = 1  # a budgeted run may end at any epoch: keep checkpoint_latest current

    def _out_of_time(self, started: float) -> bool:
        return self.time_budget_s is not None and perf_counter() - started > self.time_budget_s

    def run_training(self):
        """nnU-Net's loop (nnUNetTrainer.run_training), same hooks in the same order, plus a wall-clock stop
        and the timing of the training iterations."""
        self.on_train_start()
        started = perf_counter()
        iterations, iteration_seconds = 0, 0.0
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                tic = perf_counter()
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                iteration_seconds += perf_counter() - tic
                iterations += 1
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
        if self.local_rank == 0:
            with open(join(self.output_folder, "training_time.json"), "w") as f:
                json.dump({"iterations": iterations, "iteration_seconds": iteration_seconds,
                           "seconds_per_iteration": iteration_seconds / max(iterations, 1),
                           "device": str(self.device)}, f, indent=1)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get(ENV_FINAL_VALIDATION, "1").strip() == "0":
            self.print_to_log_file(f"{ENV_FINAL_VALIDATION}=0: skipping the final validation.")
            return
        return super().perform_actual_validation(save_probabilities)


class nnUNetTrainerBudget(TrainingBudgetMixin, nnUNetTrainer):
    """The stock nnUNetTrainer, unchanged but for the NNUNET_DIFFUSION_* run lengths (benchmarks, demos)."""
