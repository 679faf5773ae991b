"""Short, budgeted training runs for any nnU-Net trainer, set from the environment.

nnU-Net's schedule (1000 epochs x 250 iterations) is far beyond a CPU demo, a test or an equal-time benchmark.
These variables shorten it without new trainer classes; unset, nothing changes:

    NNUNET_DIFFUSION_EPOCHS          number of epochs
    NNUNET_DIFFUSION_ITERATIONS      training iterations per epoch
    NNUNET_DIFFUSION_VAL_ITERATIONS  per-epoch validation iterations
    NNUNET_DIFFUSION_SAVE_EVERY      write checkpoint_latest every this many epochs (nnU-Net: 50); what a kill
                                     loses at most, and what --c resumes from
    NNUNET_DIFFUSION_TIME_BUDGET     wall-clock seconds of training; the run stops after the iteration that
                                     exceeds it, then validates, saves checkpoint_final and runs the final
                                     validation as usual. The learning-rate schedule (nnU-Net's poly decay)
                                     is driven by the elapsed fraction of the budget instead of the epoch
                                     count, so a budgeted run anneals to zero like a full one. Under DDP, rank
                                     0's clock decides for every rank. The elapsed time is stored in the
                                     checkpoint, so --c continues the budget where it stopped.
    NNUNET_DIFFUSION_FINAL_VALIDATION=0  skip the final validation of the fold (with a sampler inside and
                                     mirroring on, it can cost more than a short training run)
    NNUNET_DIFFUSION_MIRROR_AXES     axes for mirroring, in training augmentation and test-time augmentation
                                     alike: comma-separated spatial axes of the preprocessed arrays (e.g. "2")
                                     or "none". nnU-Net mirrors every axis; where the labels depend on the
                                     position along an axis (front vs back of a brain), flipping it turns one
                                     class into another, and a short run learns the task much later. Stored
                                     by nnU-Net in the checkpoint (inference_allowed_mirroring_axes).

Every run writes fold_X/training_time.json: iterations and wall-clock seconds of the training iterations
(data loading included, per-epoch validation excluded).
"""
from __future__ import annotations

import json
import os
from os.path import join
from time import perf_counter

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam1en3
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunet_diffusion.settings import read as read_setting

ENV_INT_SETTINGS = {"NNUNET_DIFFUSION_EPOCHS": "num_epochs",
                    "NNUNET_DIFFUSION_ITERATIONS": "num_iterations_per_epoch",
                    "NNUNET_DIFFUSION_VAL_ITERATIONS": "num_val_iterations_per_epoch",
                    "NNUNET_DIFFUSION_SAVE_EVERY": "save_every"}
ENV_TIME_BUDGET = "NNUNET_DIFFUSION_TIME_BUDGET"
ENV_FINAL_VALIDATION = "NNUNET_DIFFUSION_FINAL_VALIDATION"
ENV_MIRROR_AXES = "NNUNET_DIFFUSION_MIRROR_AXES"
MAX_NON_FINITE_STEPS = 3  # consecutive non-finite training losses before a run stops (fp16 may skip a step or two)
ELAPSED_LOG_KEY = "budget_elapsed_s"  # per-epoch training seconds, kept in the checkpoint's logging (for --c)


def read_mirror_axes(num_spatial_dims: int, environ=os.environ):
    """NNUNET_DIFFUSION_MIRROR_AXES -> None (unset: nnU-Net's default), () for 'none', or a tuple of axes."""
    raw = (read_setting(ENV_MIRROR_AXES, environ) or "").lower()
    if not raw:
        return None
    if raw == "none":
        return ()
    try:
        axes = tuple(sorted({int(a) for a in raw.split(",") if a.strip()}))
    except ValueError:
        axes = ()
    if not axes or any(not 0 <= a < num_spatial_dims for a in axes):
        raise ValueError(f"{ENV_MIRROR_AXES}={raw!r} must be 'none' or comma-separated axes in "
                         f"0..{num_spatial_dims - 1} (this configuration has {num_spatial_dims} spatial axes).")
    return axes


def _read_env(name: str, cast):
    raw = read_setting(name)
    if raw is None:
        return None
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a number.") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be > 0.")
    return value


class BudgetDrivenSchedule:
    """Drives a trainer's epoch-based scheduler (nnU-Net's PolyLRScheduler: ``step(step)``, ``max_steps``) by
    the elapsed fraction of a time budget: ``step()`` (nnU-Net calls ``step(epoch)`` at every epoch start; the
    epoch is ignored) sets the rate the schedule gives at ``fraction * max_steps``."""

    def __init__(self, scheduler):
        if not hasattr(scheduler, "max_steps"):
            raise TypeError(f"a time budget needs a scheduler with step(step) and max_steps (nnU-Net's "
                            f"PolyLRScheduler); got {type(scheduler).__name__}")
        self.scheduler, self.fraction = scheduler, 0.0

    def set_fraction(self, fraction: float) -> None:
        self.fraction = min(max(fraction, 0.0), 1.0)
        self.step()

    def step(self, _epoch=None) -> None:
        # just below max_steps at the end: (1 - 1) ** 0.9 = 0 would make the last iterations a no-op
        self.scheduler.step(min(self.fraction, 0.999) * self.scheduler.max_steps)


class TrainingBudgetMixin:
    """Mix into an nnUNetTrainer (before it in the bases) to honour the NNUNET_DIFFUSION_* run lengths."""

    # the explicit signature matters: nnUNetTrainer stores its init args by inspecting it (for checkpoints)
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # read (and validate) before nnUNetTrainer makes the output folder
        lengths = {attribute: _read_env(name, int) for name, attribute in ENV_INT_SETTINGS.items()}
        time_budget_s = _read_env(ENV_TIME_BUDGET, float)
        spatial_dims = len(PlansManager(plans).get_configuration(configuration).patch_size)
        self.mirror_axes_override = read_mirror_axes(spatial_dims)
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, value in lengths.items():
            if value is not None:
                setattr(self, attribute, value)
        self.time_budget_s = time_budget_s
        if self.time_budget_s is not None:
            self.save_every = 1  # a budgeted run may end at any epoch: keep checkpoint_latest current

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.mirror_axes_override is not None:
            mirror_axes = self.mirror_axes_override or None  # nnU-Net's 'no mirroring' is None
            self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def _autocast(self):
        """nnU-Net's: autocast on CUDA, nothing elsewhere."""
        return torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _batch_on_device(self, batch: dict):
        """(image (B, C_img, *S), labels (B, 1, *S)) of a loader batch, on the training device."""
        return batch["data"].to(self.device, non_blocking=True), batch["target"].to(self.device, non_blocking=True)

    def backward_and_step(self, loss) -> None:
        """nnU-Net's update as its train_step does it: backward (scaled by the GradScaler on CUDA), gradient norm
        clipped to 12, optimizer step. Shared by every trainer of the package that computes its own loss. A step
        whose gradient is not finite is skipped (the GradScaler does this itself), so a NaN or inf loss never
        reaches the weights; ``check_finite_loss`` stops the run if it goes on."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            # the norm is of the (under DDP: all-reduced) gradients, so every rank skips alike
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            if torch.isfinite(norm):
                self.optimizer.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)

    def check_finite_loss(self, loss) -> None:
        """Stop after ``MAX_NON_FINITE_STEPS`` consecutive non-finite losses, before the epoch's checkpoints are
        written, so that the last checkpoints stay those of a finite model (``backward_and_step`` skipped those
        steps, and the fault-safety mixin refuses to save a non-finite model)."""
        if loss is None:
            return
        finite = torch.tensor([float(np.isfinite(loss).all())], device=self.device)
        if self.is_ddp:  # every rank decides alike: a rank that stops alone hangs the others in their all-reduce
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item():
            self._non_finite_steps = 0
            return
        self._non_finite_steps = getattr(self, "_non_finite_steps", 0) + 1
        if self._non_finite_steps >= MAX_NON_FINITE_STEPS:
            raise FloatingPointError(
                f"{self.__class__.__name__}: the training loss was not finite (NaN or inf) in "
                f"{self._non_finite_steps} consecutive iterations (epoch {self.current_epoch}); stopping. Those "
                f"steps were skipped, and the checkpoints in {self.output_folder} are from before (never overwritten "
                f"by a non-finite model). Try a lower learning rate, or float32 (train on CPU, or with autocast off), "
                f"then resume with --c.")

    def training_progress(self) -> float:
        """How far training is, in [0, 1]: the elapsed fraction of the time budget, else epochs done / epochs."""
        if isinstance(self.lr_scheduler, BudgetDrivenSchedule):
            return self.lr_scheduler.fraction
        return self.current_epoch / max(self.num_epochs, 1)

    def _budget_elapsed(self, started: float, offset: float) -> float:
        """Seconds of training so far (earlier runs of a --c resume included). Under DDP, rank 0's value for
        every rank: the learning rate and the stop must be the same on all ranks (a rank that stops alone
        hangs the others in their next all-reduce)."""
        elapsed = torch.tensor([offset + perf_counter() - started], dtype=torch.float64, device=self.device)
        if self.is_ddp:
            dist.broadcast(elapsed, src=0)
        return float(elapsed.item())

    def _previous_elapsed(self) -> float:
        """Training seconds of the epochs already done (a --c resume of a budgeted run), else 0."""
        logged = self.logger.local_logger.my_fantastic_logging.setdefault(ELAPSED_LOG_KEY, [])
        return float(logged[self.current_epoch - 1]) if 0 < self.current_epoch <= len(logged) else 0.0

    def run_training(self):
        """nnU-Net's loop (nnUNetTrainer.run_training), same hooks in the same order, plus a wall-clock stop
        with a learning rate annealed over the budget, and the timing of the training iterations."""
        self.on_train_start()
        budgeted = self.time_budget_s is not None
        offset = self._previous_elapsed() if budgeted else 0.0
        if budgeted:
            self.print_to_log_file(f"Time budget {self.time_budget_s:.0f} s ({offset:.0f} s already used): the "
                                   f"learning rate follows the poly schedule over the budget.")
            self.lr_scheduler = BudgetDrivenSchedule(self.lr_scheduler)
            self.lr_scheduler.set_fraction(offset / self.time_budget_s)
        started = perf_counter()
        iterations, iteration_seconds, elapsed = 0, 0.0, offset
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                if budgeted:
                    self.lr_scheduler.set_fraction(elapsed / self.time_budget_s)
                tic = perf_counter()
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                self.check_finite_loss(train_outputs[-1].get("loss"))
                iteration_seconds += perf_counter() - tic
                iterations += 1
                if budgeted:
                    elapsed = self._budget_elapsed(started, offset)
                    if elapsed > self.time_budget_s:
                        break
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            if budgeted:
                self.logger.log(ELAPSED_LOG_KEY, elapsed, self.current_epoch)  # before on_epoch_end saves
            self.on_epoch_end()
            if budgeted and elapsed > self.time_budget_s:
                self.print_to_log_file(f"Time budget of {self.time_budget_s:.0f} s reached: stopping.")
                break
        self.on_train_end()
        if self.local_rank == 0:
            with open(join(self.output_folder, "training_time.json"), "w") as f:
                json.dump({"iterations": iterations, "iteration_seconds": iteration_seconds,
                           "seconds_per_iteration": iteration_seconds / max(iterations, 1),
                           "device": str(self.device),
                           # peak GPU memory of the whole run (model, optimizer, activations), for benchmarks
                           "peak_gpu_mib": (torch.cuda.max_memory_allocated(self.device) / 2 ** 20
                                            if self.device.type == "cuda" else None)}, f, indent=1)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if read_setting(ENV_FINAL_VALIDATION) == "0":
            self.print_to_log_file(f"{ENV_FINAL_VALIDATION}=0: skipping the final validation.")
            return
        return super().perform_actual_validation(save_probabilities)


class nnUNetTrainerBudget(TrainingBudgetMixin, nnUNetTrainer):
    """The stock nnUNetTrainer, unchanged but for the NNUNET_DIFFUSION_* run lengths (benchmarks, demos)."""


class nnUNetTrainerBudgetAdam1en3(TrainingBudgetMixin, nnUNetTrainerAdam1en3):
    """The stock network with nnU-Net's own AdamW trainer (lr 1e-3, ``nnUNetTrainerAdam1en3``) and the run lengths:
    the second stock row of every benchmark. Our diffusion trainers train with AdamW, so a lead over the SGD row
    alone may be the optimiser's; a claim that diffusion helps holds only over both rows."""


class nnUNetTrainerBudgetAdam1en3NoDeepSupervision(TrainingBudgetMixin, nnUNetTrainerAdam1en3):
    """nnUNetTrainerBudgetAdam1en3 without deep supervision (as nnU-Net's nnUNetTrainerNoDeepSupervision): the stock
    anchor that differs from the AdamW row only where our trainers do (they supervise the last output alone), so a
    benchmark can tell what deep supervision is worth at the budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
