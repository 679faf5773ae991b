"""Derive a narrower copy of nnU-Net's plans for machines far below the GPU that nnU-Net plans for.

nnU-Net plans a network for a GPU memory target (32 base features, up to 320): on 2 CPU cores one iteration of
that network on a whole-brain 3D patch costs seconds, and a run of minutes sees too few iterations to learn.
Editing a plans file into a new plans identifier is nnU-Net's documented way to change the network
(documentation/explanation_plans_files.md): this writes ``<target>.json`` beside the source plans, with the
same preprocessed data (``data_identifier`` unchanged, nothing is preprocessed again), the same stages,
kernels, strides and patch, and ``features_per_stage`` scaled down. Train and predict with ``-p <target>``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from typing import Optional, Sequence

CONFIGURATIONS = ("2d", "3d_fullres")


def narrowed_features(features: Sequence[int], base: int, maximum: int) -> list[int]:
    """nnU-Net's rule (double per stage, capped), started from ``base``: (32, 64, 128, 256, 320) -> base 16,
    max 128: (16, 32, 64, 128, 128)."""
    return [min(base * 2 ** s, maximum) for s in range(len(features))]


def derive_small_plans(plans: dict, target_name: str, base_features: int, max_features: int,
                       configurations: Sequence[str] = CONFIGURATIONS, max_batch_size: Optional[int] = None) -> dict:
    """A copy of ``plans`` named ``target_name`` whose configurations have narrower U-Nets, and batches of at most
    ``max_batch_size`` (None: as planned). Why a cap: nnU-Net grows the batch until the GPU memory it plans for is
    used; for small patches its ResEnc presets plan hundreds of patches (647 of 40 x 40 for the example, 2d)."""
    if base_features < 1 or max_features < base_features:
        raise ValueError(f"need 1 <= base_features <= max_features, got {base_features}, {max_features}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    small = copy.deepcopy(plans)
    small["plans_name"] = target_name
    for name in configurations:
        if name not in small["configurations"]:
            continue
        kwargs = small["configurations"][name]["architecture"]["arch_kwargs"]
        kwargs["features_per_stage"] = narrowed_features(kwargs["features_per_stage"], base_features, max_features)
        if max_batch_size is not None and "batch_size" in small["configurations"][name]:
            small["configurations"][name]["batch_size"] = min(small["configurations"][name]["batch_size"],
                                                              max_batch_size)
    return small


def write_small_plans(preprocessed_dataset_folder: str, source: str = "nnUNetPlans", target: str = "nnUNetPlans_CPU",
                      base_features: int = 16, max_features: int = 128, overwrite: bool = False,
                      max_batch_size: Optional[int] = None) -> str:
    """Read ``<folder>/<source>.json``, write ``<folder>/<target>.json`` (atomically) and return its path."""
    source_path = os.path.join(preprocessed_dataset_folder, f"{source}.json")
    target_path = os.path.join(preprocessed_dataset_folder, f"{target}.json")
    if not os.path.isfile(source_path):
        raise FileNotFoundError(f"{source_path} not found: run nnUNetv2_plan_and_preprocess for this dataset first")
    if os.path.exists(target_path) and not overwrite:
        raise FileExistsError(f"{target_path} exists: pass --overwrite to replace it (models trained with it "
                              f"keep their own copy in nnUNet_results)")
    with open(source_path) as f:
        small = derive_small_plans(json.load(f), target, base_features, max_features, max_batch_size=max_batch_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{target}_", suffix=".json", dir=preprocessed_dataset_folder)
    with os.fdopen(fd, "w") as f:
        json.dump(small, f, indent=4)
    os.replace(tmp, target_path)
    return target_path


def main(argv: Optional[list[str]] = None) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed
    p = argparse.ArgumentParser(description="Write a narrower copy of a dataset's nnU-Net plans (for CPUs and "
                                            "small GPUs); train and predict with -p <target>.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("--source", default="nnUNetPlans")
    p.add_argument("--target", default="nnUNetPlans_CPU")
    p.add_argument("--base-features", type=int, default=16)
    p.add_argument("--max-features", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=None, help="cap every configuration's batch size")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if nnUNet_preprocessed is None:
        p.error("nnUNet_preprocessed is not set")
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.dataset))
    try:
        path = write_small_plans(folder, args.source, args.target, args.base_features, args.max_features,
                                 args.overwrite, args.max_batch_size)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        p.error(str(e))
    print(path)
    return path
