"""Nothing the user had is lost, and bad input stops before any work: the fault guarantees of every trainer of
the package (docs/explanation/faults.md).

``FaultSafetyMixin`` goes into a trainer's bases before TrainingBudgetMixin and nnUNetTrainer. It adds to nnU-Net's
trainer:
- the preprocessed cases and the raw training images (read whole: a truncated .nii.gz) checked at
  ``on_train_start`` (``data_checks``; dataset.json and the plans are checked by each trainer's ``__init__`` first
  thing, before any folder is made);
- checkpoints written atomically (temporary file, then rename) and never from a model with non-finite weights;
- on ``--c``, a checkpoint that is read and checked (readable, same trainer, same plans and configuration, same
  stored settings) before anything is loaded; without ``--c``, a folder that already holds checkpoints is refused
  instead of overwritten;
- running out of GPU memory in training stops with the planned patch and batch and what to change.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from nnunet_diffusion.trainers.common.data_checks import ENCODER_BLOCKS_KEY, check_training_cases, check_training_images

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
# configuration entries that decide the network and its data: a checkpoint trained with other values does not fit
NETWORK_KEYS = ("patch_size", "spacing", "network_arch_class_name", "network_arch_init_kwargs",
                "normalization_schemes")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and the fix."""


def read_checkpoint(path: str) -> dict:
    """torch.load of an nnU-Net checkpoint, or CheckpointError naming the file, what is wrong and the fix."""
    fix = (f"Move it away and resume from another checkpoint of that folder (nnUNetv2_train --c uses "
           f"{', then '.join(CHECKPOINT_NAMES)}), or start a new training in an empty folder.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, corrupted or not a torch file
        raise CheckpointError(f"{path} cannot be read as a checkpoint: it is truncated or corrupted "
                              f"({type(error).__name__}: {str(error)[:200]}). {fix}") from None
    missing = [k for k in ("network_weights", "init_args", "trainer_name", "current_epoch")
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not an nnU-Net training checkpoint (it lacks {missing}). {fix}")
    return checkpoint


def checkpoint_mismatch(checkpoint: dict, trainer_name: str, plans: dict, configuration: str,
                        settings_key: Optional[str], run_dependent: tuple = ("text",)) -> Optional[str]:
    """What makes ``checkpoint`` unfit to resume this run (trainer, plans, configuration, stored settings), or None.
    ``run_dependent``: entries of the settings that may differ on resume (checked by their own code, e.g. the
    text embeddings by ClassTextMixin)."""
    if checkpoint["trainer_name"] != trainer_name:
        return (f"it was written by {checkpoint['trainer_name']}, not {trainer_name}. Resume it with "
                f"-tr {checkpoint['trainer_name']}")
    init_args = checkpoint["init_args"]
    trained_plans, trained_configuration = init_args.get("plans", {}), init_args.get("configuration")
    for key in ("dataset_name", "plans_name"):
        if trained_plans.get(key) != plans.get(key):
            return f"it was trained with {key} {trained_plans.get(key)!r}, this run has {plans.get(key)!r}"
    if trained_configuration != configuration:
        return f"it was trained on configuration {trained_configuration!r}, this run is {configuration!r}"
    trained = trained_plans.get("configurations", {}).get(configuration, {})
    current = plans["configurations"][configuration]
    changed = [k for k in NETWORK_KEYS if trained.get(k) != current.get(k)]
    if changed:
        return (f"the plans changed since it was trained ({', '.join(f'{k}: {trained.get(k)} -> {current.get(k)}' for k in changed)}"
                f"); restore the plans it was trained with")
    if settings_key is not None:
        before = {k: v for k, v in trained.get(settings_key, {}).items() if k not in run_dependent}
        now = {k: v for k, v in current.get(settings_key, {}).items() if k not in run_dependent}
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            return (f"it was trained with other {settings_key} settings "
                    f"({', '.join(f'{k}: {before.get(k)} -> {now.get(k)}' for k in changed)}); resume with the "
                    f"NNUNET_DIFFUSION_* variables of the first run")
    return None


def check_finite_weights(module: torch.nn.Module, filename: str) -> None:
    """FloatingPointError if a parameter or buffer of ``module`` is NaN or inf (it is then not saved)."""
    bad = [name for name, t in (*module.named_parameters(), *module.named_buffers())
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(
            f"Not writing {filename}: the model has non-finite weights ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the checkpoints already in that folder are kept. Try a lower "
            f"learning rate or float32, then resume with --c.")


class FaultSafetyMixin:
    """For nnUNetTrainer subclasses, before TrainingBudgetMixin in the bases. ``settings_key``: where plans.json
    keeps the method's stored settings (checked on --c)."""

    settings_key: Optional[str] = None
    # entries of the settings block that depend on the dataset or the run, not on the class: not type-checked
    # against the class defaults, and free to differ on resume (checked by their own code, e.g. ClassTextMixin)
    extra_settings_keys: tuple = ("text", ENCODER_BLOCKS_KEY)
    resumed_from: Optional[str] = None  # the checkpoint --c resumed from (set by load_checkpoint)

    # ---- at the start of training -----------------------------------------------------------------------------

    def on_train_start(self):
        existing = [n for n in CHECKPOINT_NAMES if os.path.isfile(os.path.join(self.output_folder, n))]
        if self.resumed_from is None and existing:
            raise FileExistsError(
                f"{self.output_folder} already holds {', '.join(existing)} of an earlier training; a new training "
                f"would overwrite them. Resume it with nnUNetv2_train ... --c, or move that folder away to start over.")
        if self.local_rank == 0:
            self._check_training_cases()
        super().on_train_start()

    def _check_training_cases(self) -> None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        raw = os.environ.get("nnUNet_raw")  # unset, or no such folder: the check is skipped
        raw_folder = os.path.join(raw, self.plans_manager.dataset_name) if raw else None
        check_training_images(self.__class__.__name__, raw_folder, self.dataset_json, self.configuration_name)
        folder = self.preprocessed_dataset_folder
        if not os.path.isdir(folder):
            return  # nnU-Net says so itself when it loads the data
        identifiers = infer_dataset_class(folder).get_identifiers(folder)
        check_training_cases(self.__class__.__name__, folder, identifiers, self.fold,
                             os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json"),
                             [int(v) for v in self.label_manager.foreground_labels])

    def run_training(self):
        try:
            return super().run_training()
        except torch.OutOfMemoryError:
            raise MemoryError(self.out_of_memory_message()) from None

    def out_of_memory_message(self) -> str:
        cm = self.configuration_manager
        return (f"{self.__class__.__name__} ran out of {self.device.type.upper()} memory in training (epoch "
                f"{self.current_epoch}; patch {list(cm.patch_size)}, batch {cm.batch_size}). Nothing was overwritten: "
                f"the checkpoints in {self.output_folder} are from before. Lower 'batch_size' (then 'patch_size', a "
                f"multiple of the strides) of configuration '{self.configuration_name}' in nnUNetPlans.json, or plan "
                f"with a smaller target: nnUNetv2_plan_experiment -d <dataset> -gpu_memory_target <GB> "
                f"-overwrite_plans_name <name>, then train with -p <name>. The cost table "
                f"(docs/explanation/benchmarks.md) says how much memory each trainer needs against the stock trainer.")

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's, refused for a model with non-finite weights, written to a temporary file beside ``filename``
        and renamed into place (atomic on POSIX): a kill during the write leaves the previous checkpoint under the
        final name, never a truncated one."""
        if self.local_rank == 0 and not self.disable_checkpointing:
            network = self.network.module if self.is_ddp else self.network
            check_finite_weights(network, filename)
        folder, name = os.path.split(filename)
        partial = os.path.join(folder, f".{name}.partial")
        super().save_checkpoint(partial)
        if os.path.exists(partial):  # rank 0 only, and not with checkpointing disabled
            os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, after reading the file and checking that it belongs to this run (see ``checkpoint_mismatch``);
        every problem stops here, before anything is loaded, naming the file and the fix."""
        if isinstance(filename_or_checkpoint, str):
            checkpoint = read_checkpoint(filename_or_checkpoint)
            problem = checkpoint_mismatch(checkpoint, self.__class__.__name__, self.plans_manager.plans,
                                          self.configuration_name, self.settings_key, self.extra_settings_keys)
            if problem:
                raise CheckpointError(f"Cannot resume from {filename_or_checkpoint}: {problem}. Or move that folder "
                                      f"away and start a new training.")
            self.resumed_from = filename_or_checkpoint
        super().load_checkpoint(filename_or_checkpoint)
