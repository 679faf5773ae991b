"""What our trainers cannot train, found at trainer start with the fix in the message (never hours in).

Two kinds of checks: on dataset.json and the plans (``check_dataset_and_plans``, before nnU-Net makes any folder),
and on the preprocessed cases and the raw training images (``check_training_cases``, ``check_training_images``, at
``on_train_start``, before the first iteration).
Each raises ``DataCheckError`` (a ValueError) that says what is wrong, where, and what to do.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Optional

import numpy as np

NUM_FOLDS = 5  # nnU-Net's default cross-validation (do_split: generate_crossval_split(..., n_splits=5))


# the plans' network classes our encoders are built like (conditional_unet.plans_encoder): nnU-Net's default plans and
# its Residual Encoder presets (-pl nnUNetPlannerResEncM/L/XL)
PLANS_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")
# in a method's settings block of plans.json: 'residual' for a model whose encoders were built with ResEnc's residual
# blocks. A model trained on ResEnc plans without it is from before they were built: its encoders are plain
ENCODER_BLOCKS_KEY = "encoder_blocks"


class DataCheckError(ValueError):
    """Input a trainer cannot use; the message says what to change."""


def check_dataset_and_plans(trainer_name: str, plans: dict, configuration: str, dataset_json: dict) -> None:
    """Labels and configuration: region-based or ignore labels, label values that are not 0..N-1, a configuration
    the plans do not have (a 3d one for 2D images), and a patch the network's strides cannot divide."""
    check_labels(trainer_name, dataset_json)
    check_configuration(trainer_name, plans, configuration)


def check_labels(trainer_name: str, dataset_json: dict) -> None:
    labels = dataset_json.get("labels") or {}
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise DataCheckError(
            f"{trainer_name} cannot train region-based datasets (dataset.json 'labels' with tuples of label "
            f"values): it predicts one class per voxel. Use one integer per class, or the stock nnUNetTrainer for "
            f"region-based training.")
    if "ignore" in labels:
        raise DataCheckError(
            f"{trainer_name} cannot train datasets with an 'ignore' label (sparse annotations): it needs a class for "
            f"every voxel. Remove 'ignore' from dataset.json 'labels' (and relabel those voxels) or use the stock "
            f"nnUNetTrainer.")
    values = sorted(int(v) for v in labels.values())
    if values != list(range(len(values))):
        raise DataCheckError(
            f"dataset.json 'labels' has the values {values}; {trainer_name} needs consecutive values 0..{len(values) - 1} "
            f"(one output channel per value, background 0). Renumber the label files and 'labels' in "
            f"nnUNet_raw, then run nnUNetv2_plan_and_preprocess again.")


def check_configuration(trainer_name: str, plans: dict, configuration: str) -> None:
    configurations = plans.get("configurations", {})
    dataset = plans.get("dataset_name", "the dataset")
    if configuration not in configurations:
        only_2d = set(configurations) == {"2d"}
        hint = (f"{dataset} has 2D images (one slice each), for which nnU-Net plans only '2d': train "
                f"`nnUNetv2_train {dataset} 2d <fold> -tr {trainer_name}`." if only_2d and configuration.startswith("3d")
                else f"Choose one of {sorted(configurations)}.")
        raise DataCheckError(f"The plans of {dataset} have no configuration '{configuration}'. {hint}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    manager = PlansManager(plans).get_configuration(configuration)
    network = str(manager.network_arch_class_name).rsplit(".", 1)[-1]
    if network not in PLANS_NETWORKS:
        # every method builds its encoders the way one of these builds its stages: another class would silently
        # train a network other than the one asked for
        raise DataCheckError(
            f"Configuration '{configuration}' of {dataset} asks for a {network}; {trainer_name} builds its encoders "
            f"as {' or '.join(PLANS_NETWORKS)} (nnU-Net's default plans or its ResEnc presets) and cannot build "
            f"this one. Train with those plans (-p nnUNetPlans or -p nnUNetResEncUNetMPlans), or a stock trainer.")
    patch = [int(p) for p in manager.patch_size]
    if configuration.startswith("3d") and (len(patch) != 3 or 1 in patch):
        raise DataCheckError(
            f"Configuration '{configuration}' of {dataset} has the patch {patch}: a 3d network needs three axes longer "
            f"than one voxel. For 2D images train the '2d' configuration.")
    strides = (manager.network_arch_init_kwargs or {}).get("strides")
    if strides is None:
        return
    strides = np.array([[s] * len(patch) if np.isscalar(s) else s for s in strides], dtype=int)
    if strides.shape[1] != len(patch) or (strides < 1).any():
        raise DataCheckError(f"The strides {strides.tolist()} of configuration '{configuration}' do not fit its "
                             f"{len(patch)}-axis patch {patch}. Plan again with nnUNetv2_plan_experiment.")
    total = strides.prod(axis=0)
    bad = [axis for axis in range(len(patch)) if patch[axis] % total[axis]]
    if bad:
        fixed = [int(np.ceil(p / t) * t) for p, t in zip(patch, total)]
        raise DataCheckError(
            f"Configuration '{configuration}' of {dataset}: the patch {patch} is not divisible by the product of the "
            f"strides {total.tolist()} along axes {bad}, so the U-Net's skips would not line up. Set 'patch_size' to "
            f"a multiple of the strides in nnUNetPlans.json (e.g. {fixed}) or plan again with "
            f"nnUNetv2_plan_experiment.")


def check_training_cases(trainer_name: str, preprocessed_folder: str, identifiers: list, fold,
                         splits_file: str, foreground_labels: list) -> None:
    """Enough cases for the folds, and every foreground class present in at least one training case."""
    if not identifiers:
        raise DataCheckError(f"{preprocessed_folder} holds no preprocessed cases. Run nnUNetv2_plan_and_preprocess.")
    if fold != "all" and not os.path.isfile(splits_file) and len(identifiers) < NUM_FOLDS:
        raise DataCheckError(
            f"The dataset has {len(identifiers)} training cases, fewer than nnU-Net's {NUM_FOLDS} cross-validation "
            f"folds. Train on all cases with fold 'all' (`nnUNetv2_train <dataset> <configuration> all -tr "
            f"{trainer_name}`), add cases, or write your own {splits_file}.")
    found = set()
    for identifier in identifiers:
        locations = _class_locations(os.path.join(preprocessed_folder, f"{identifier}.pkl"))
        if locations is None:
            return  # properties without class locations (not nnU-Net's training preprocessing): nothing to check
        found |= {int(k) for k, v in locations.items() if v is not None and len(v) > 0}
        if found >= set(foreground_labels):
            return
    absent = sorted(set(foreground_labels) - found)
    raise DataCheckError(
        f"Label value(s) {absent} of dataset.json 'labels' occur in none of the {len(identifiers)} preprocessed "
        f"training cases in {preprocessed_folder}: {trainer_name} cannot learn a class it never sees. Check the "
        f"label files, or remove the class from dataset.json 'labels' (renumbering the others to stay "
        f"consecutive), then run nnUNetv2_plan_and_preprocess again.")


def check_training_images(trainer_name: str, raw_dataset_folder: Optional[str], dataset_json: dict,
                          configuration: str) -> None:
    """The raw training images and labels (``imagesTr``/``labelsTr`` by dataset.json's file_ending, or its
    'dataset' list) read whole (``whole_files.whole_file_problem``: a gzip stream to its end, a NIfTI file against
    its header): SimpleITK reads a truncated .nii.gz without complaint and preprocessing makes zeros of what is
    missing, so the preprocessed case is wrong too. Skipped without the raw folder (the preprocessed data may have
    been made elsewhere)."""
    if not raw_dataset_folder or not os.path.isdir(raw_dataset_folder):
        return
    files = _raw_training_files(raw_dataset_folder, dataset_json)
    if not files:
        return
    from concurrent.futures import ThreadPoolExecutor
    from nnunet_diffusion.inference.whole_files import whole_file_problem
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:  # zlib runs without the GIL
        problems = list(pool.map(whole_file_problem, files))
    bad = [f"{path} {problem}" for path, problem in zip(files, problems) if problem]
    if not bad:
        return
    dataset = os.path.basename(os.path.normpath(raw_dataset_folder))
    match = re.match(r"Dataset(\d+)_", dataset)
    dataset_id = int(match.group(1)) if match else dataset
    shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
    raise DataCheckError(
        f"{len(bad)} raw training file(s) of {dataset} cannot be used: {shown}. nnU-Net's preprocessing reads such a "
        f"file without complaint (what is missing becomes zeros), so the preprocessed cases made from them are wrong "
        f"as well. Copy the file(s) again from their source, preprocess again (nnUNetv2_preprocess -d {dataset_id} -c {configuration}; "
        f"or remove the case from nnUNet_raw and run nnUNetv2_plan_and_preprocess -d {dataset_id} "
        f"--verify_dataset_integrity), then start {trainer_name} again.")


def _raw_training_files(raw_dataset_folder: str, dataset_json: dict) -> list:
    """The raw images and labels nnU-Net preprocesses for training (those that exist)."""
    files = []
    if isinstance(dataset_json.get("dataset"), dict):  # explicit file lists, relative to the dataset folder
        for entry in dataset_json["dataset"].values():
            for path in [*(entry.get("images") or []), entry.get("label")]:
                if path:
                    files.append(path if os.path.isabs(path) else os.path.join(raw_dataset_folder, path))
    else:
        ending = dataset_json.get("file_ending", "")
        for sub in ("imagesTr", "labelsTr"):
            folder = os.path.join(raw_dataset_folder, sub)
            if ending and os.path.isdir(folder):
                files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(ending)]
    return [f for f in files if os.path.isfile(f)]


def _class_locations(properties_file: str) -> Optional[dict]:
    try:
        with open(properties_file, "rb") as f:
            properties = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as error:  # truncated or foreign: the case cannot be trained either
        raise DataCheckError(f"{properties_file} cannot be read ({type(error).__name__}: {error}). Run "
                             f"nnUNetv2_plan_and_preprocess again for this dataset.") from None
    return properties.get("class_locations") if isinstance(properties, dict) else None


def check_stored_settings(block, defaults: dict, where: str, extra_keys=()) -> None:
    """A method's settings block of plans.json (written by its trainer, stored with the model) against the trainer's
    defaults: a dict, no unknown keys, every value of its default's type (nested blocks alike). ``extra_keys``: keys
    of the block that depend on the dataset or the run (not in ``defaults``; checked where they are used).
    ``where`` names the file and block in the message."""
    fix = ("This block is written by the trainer and stored with the model; restore the plans.json the model was "
           "trained with (or the value shown), or train again.")

    def check(value, default, path):
        if default is None:
            return
        name = ".".join(path) or "the block"
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise DataCheckError(f"{where}: {name} must be a mapping, not {value!r}. {fix}")
            unknown = sorted(set(value) - set(default) - (set(extra_keys) if not path else set()))
            if unknown:
                raise DataCheckError(f"{where}: unknown key(s) {unknown} in {name}; valid: {sorted(default)}. {fix}")
            for key, item in value.items():
                if key in default and not (not path and key in extra_keys):
                    check(item, default[key], path + [key])
            return
        expected = (bool,) if isinstance(default, bool) else (int,) if isinstance(default, int) else \
            (int, float) if isinstance(default, float) else (str,) if isinstance(default, str) else \
            (list, tuple) if isinstance(default, (list, tuple)) else (type(default),)
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise DataCheckError(f"{where}: {name} is {value!r}, not of type {'/'.join(t.__name__ for t in expected)} "
                                 f"(this trainer's default: {default!r}). {fix}")

    check(block, defaults, [])
