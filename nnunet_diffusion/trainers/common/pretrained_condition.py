"""A stock nnU-Net model as a frozen, pre-trained condition network (UniSegDiff's CFENet, Sec. 2.1 and 2.3).

nnU-Net users already train the stock ``nnUNetTrainer`` on their dataset; its checkpoint for the same plans,
configuration and fold is exactly a segmentation-pre-trained feature extractor. ``-pretrained_weights`` cannot
fill a sub-network (nnU-Net asserts every key of the whole model), so we load it here, strictly, and freeze it
when the network is built (DDP then never expects its gradients).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def stock_checkpoint_path(results: str, dataset_name: str, plans_identifier: str, configuration: str, fold,
                          trainer: str = "nnUNetTrainer", checkpoint: str = "checkpoint_final.pth") -> Path:
    """Where nnU-Net writes that model: <nnUNet_results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>/."""
    return (Path(results) / dataset_name / f"{trainer}__{plans_identifier}__{configuration}" / f"fold_{fold}"
            / checkpoint)


def make_condition_command(dataset_id: str, plans_identifier: str, configuration: str, fold,
                           trainer: str = "nnUNetTrainer") -> str:
    if trainer == "nnUNetTrainer":
        return (f"nnUNetv2_train {dataset_id} {configuration} {fold} -p {plans_identifier} "
                f"(the stock nnUNetTrainer, same dataset, plans, configuration and fold)")
    return f"nnUNetv2_train {dataset_id} {configuration} {fold} -p {plans_identifier} -tr {trainer}"


def read_condition_checkpoint(checkpoint_path: os.PathLike, dataset_id: str, plans_identifier: str,
                              configuration: str, fold, trainer: str = "nnUNetTrainer",
                              what: str = "The pre-trained condition network") -> dict:
    """The network weights of a checkpoint of ``trainer`` (default the stock nnU-Net), after checking that it exists
    and was trained with these plans and configuration. Every problem is a ValueError that names the file and the
    command that makes it; ``what`` names the part that needs it."""
    path = Path(checkpoint_path)
    make_it = make_condition_command(dataset_id, plans_identifier, configuration, fold, trainer)
    if not path.is_file():
        raise ValueError(f"{what} needs {path}, which does not exist. Make it with: {make_it}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or foreign file: say which and how to remake it
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(error).__name__}: {error}). Make it again "
                         f"with: {make_it}") from None
    init_args = checkpoint.get("init_args", {}) if isinstance(checkpoint, dict) else {}
    trained_for = (init_args.get("plans", {}).get("plans_name"), init_args.get("configuration"))
    if trained_for != (plans_identifier, configuration):
        raise ValueError(f"{path} was trained with plans {trained_for[0]!r}, configuration {trained_for[1]!r}; "
                         f"this model needs {plans_identifier!r}, {configuration!r}. Make it with: {make_it}")
    return checkpoint["network_weights"]


def load_frozen_condition_network(network: nn.Module, checkpoint_path: os.PathLike, dataset_id: str,
                                  plans_identifier: str, configuration: str, fold,
                                  weights: dict | None = None) -> nn.Module:
    """Load a stock nnU-Net checkpoint (or its already read ``weights``) into ``network`` (built from the same plans
    and configuration), strictly, and freeze it (no parameter requires a gradient). Every problem is a ValueError
    that names the expected file and the command that makes it."""
    if weights is None:
        weights = read_condition_checkpoint(checkpoint_path, dataset_id, plans_identifier, configuration, fold)
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{checkpoint_path} does not fit the condition network of these plans ({error}). Make it "
                         f"with: {make_condition_command(dataset_id, plans_identifier, configuration, fold)}") from None
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network
