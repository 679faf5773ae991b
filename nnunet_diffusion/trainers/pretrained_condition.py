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


def load_frozen_condition_network(network: nn.Module, checkpoint_path: os.PathLike, dataset_id: str,
                                  plans_identifier: str, configuration: str, fold) -> nn.Module:
    """Load a stock nnU-Net checkpoint into ``network`` (built from the same plans and configuration), strictly,
    and freeze it (no parameter requires a gradient). Every problem is a ValueError that names the expected file
    and the command that makes it."""
    path = Path(checkpoint_path)
    make_it = (f"nnUNetv2_train {dataset_id} {configuration} {fold} -p {plans_identifier} "
               f"(the stock nnUNetTrainer, same dataset, plans, configuration and fold)")
    if not path.is_file():
        raise ValueError(f"The pre-trained condition network needs {path}, which does not exist. Make it with: "
                         f"{make_it}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    init_args = checkpoint.get("init_args", {})
    trained_for = (init_args.get("plans", {}).get("plans_name"), init_args.get("configuration"))
    if trained_for != (plans_identifier, configuration):
        raise ValueError(f"{path} was trained with plans {trained_for[0]!r}, configuration {trained_for[1]!r}; "
                         f"this model needs {plans_identifier!r}, {configuration!r}. Make it with: {make_it}")
    try:
        network.load_state_dict(checkpoint["network_weights"], strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the condition network of these plans ({error}). Make it with: "
                         f"{make_it}") from None
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network
