"""nnUNetTrainerPackageBase: what every trainer of this package shares, diffusion or not (DSM).

- start-up checks of the dataset and plans before any folder is made, and the method's settings stored in
  plans.json under ``settings_key`` (``model_settings``: called before nnU-Net's __init__, so it may refuse);
- fault safety (``FaultSafetyMixin``) and run lengths (``TrainingBudgetMixin``), in the order the guarantees need
  (fault safety outermost: its out-of-memory message wraps the budgeted loop; tests/trainers/test_mixin_order.py);
- AdamW with nnU-Net's poly decay (``optimizer_kind``, ``learning_rate``, ``adamw_weight_decay``), no deep
  supervision;
- torch.compile under nnU-Net's switch (``nnUNet_compile``; on by default on CUDA, off on the CPU), of the step
  networks in place (``architectures/compilation.py``), not of the whole network as the stock trainer does;
- activation checkpointing by device (``activation_checkpointing``);
- one train_step / validation_step around the method's ``training_loss`` (loss, output, target) and its
  ``validation_scores`` (class scores for nnU-Net's per-epoch pseudo-Dice).
"""
from __future__ import annotations

import copy
import os
import pydoc

import torch
from torch import nn

from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_diffusion.architectures.compilation import compile_step_networks, decompile_step_networks
from nnunet_diffusion.architectures.conditional_unet import RESIDUAL_BLOCKS
from nnunet_diffusion.settings import read as read_setting
from nnunet_diffusion.trainers.common.budget import TrainingBudgetMixin
from nnunet_diffusion.trainers.common.data_checks import ENCODER_BLOCKS_KEY, check_dataset_and_plans
from nnunet_diffusion.trainers.common.fault_safety import FaultSafetyMixin

# when the network recomputes its activations in backward (``checkpoint_activations`` of its modules): 'cuda' only
# when training on a GPU, whose memory nnU-Net planned the patch and batch for; 'always'; 'never'. It trades one more
# forward per checkpointed block for memory and never changes the model (losses and gradients are equal: tested)
ACTIVATION_CHECKPOINTING = ("cuda", "always", "never")
ACTIVATION_CHECKPOINTING_ENV = "NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING"


def hard_dice_counts(scores: torch.Tensor, target: torch.Tensor) -> dict:
    """scores (B, N, *S) per-class scores, target (B, 1, *S) labels -> nnU-Net's per-epoch validation counts of the
    argmax segmentation (tp, fp, fn per foreground class, background dropped as the stock trainer does)."""
    segmentation = scores.argmax(1, keepdim=True)
    onehot = torch.zeros_like(scores).scatter_(1, segmentation, 1)
    tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=[0] + list(range(2, onehot.ndim)))
    return {"tp_hard": tp.detach().cpu().numpy()[1:], "fp_hard": fp.detach().cpu().numpy()[1:],
            "fn_hard": fn.detach().cpu().numpy()[1:]}


class nnUNetTrainerPackageBase(FaultSafetyMixin, TrainingBudgetMixin, nnUNetTrainer):
    """Base of every trainer of the package. Subclasses define ``settings_key``, ``model_settings``,
    ``build_network_architecture``, ``training_loss`` and ``validation_scores``."""

    settings_key: str
    # chosen by measurement (benchmarks/optimizers/): 'adamw' (the denoisers' usual: Diff-UNet, MedSegDiff,
    # ImgX-DiffSeg) learned as well as or better than nnU-Net's 'sgd' (Nesterov, momentum 0.99, lr 1e-2) for
    # every diffusion trainer at an equal budget; both with nnU-Net's poly decay. Variants: <trainer>_SGD
    optimizer_kind: str = "adamw"
    learning_rate: float | None = 1e-3  # None: nnU-Net's initial_lr (1e-2)
    adamw_weight_decay: float = 1e-2
    # one of ACTIVATION_CHECKPOINTING; NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING overrides it at training
    activation_checkpointing: str = "cuda"
    compile_backend: str = "inductor"  # torch.compile's backend where nnU-Net's switch compiles (its default)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # fail now, before any folder is made (and not hours later), on data or settings we cannot handle
        check_dataset_and_plans(self.__class__.__name__, plans, configuration, dataset_json)
        self._checkpointing_policy()  # a bad NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING fails here too
        plans = copy.deepcopy(plans)
        settings = self.model_settings(plans, configuration, fold, dataset_json)
        if configuration in plans.get("configurations", {}) and RESIDUAL_BLOCKS in (
                PlansManager(plans).get_configuration(configuration).network_arch_init_kwargs):
            settings = {**settings, ENCODER_BLOCKS_KEY: "residual"}  # ResEnc plans: residual blocks, said so
        if configuration in plans.get("configurations", {}):
            # stored with the model: on_train_start copies these plans into the results folder
            plans["configurations"][configuration][self.settings_key] = settings
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        if self.learning_rate is not None:
            self.initial_lr = self.learning_rate

    def model_settings(self, plans: dict, configuration: str, fold, dataset_json: dict) -> dict:
        """The settings block stored with the model (plans.json, ``settings_key``): what the network is rebuilt
        from. Called before nnU-Net's __init__: it may raise on bad input before any folder is made."""
        raise NotImplementedError  # abstract: the diffusion base and DSM define it (tests/trainers/test_mixin_order.py)

    @classmethod
    def plans_unet_kwargs(cls, configuration_manager: ConfigurationManager) -> dict:
        """The plans' U-Net arguments (stages, features, kernels, strides, norm) with classes imported: PlainConvUNet's
        (``n_conv_per_stage``) or ResEnc's (``n_blocks_per_stage``; ``conditional_unet.plans_encoder`` builds both)."""
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        for key in configuration_manager.network_arch_init_kwargs_req_import:
            if kwargs.get(key) is not None:
                kwargs[key] = pydoc.locate(kwargs[key])
        stored = configuration_manager.configuration.get(cls.settings_key) or {}
        if RESIDUAL_BLOCKS in kwargs and stored.get(ENCODER_BLOCKS_KEY) != "residual":
            # a model trained on ResEnc plans before residual blocks were built: plain, as it was trained
            kwargs["n_conv_per_stage"] = kwargs.pop(RESIDUAL_BLOCKS)
        kwargs.pop("deep_supervision", None)
        return kwargs

    def _network(self) -> nn.Module:
        """The network without its DDP and torch.compile wrappers."""
        network = self.network.module if self.is_ddp else self.network
        return getattr(network, "_orig_mod", network)

    def initialize(self):
        """nnU-Net's, then torch.compile by nnU-Net's switch (``compile_step_networks_enabled``) and the activation
        checkpointing for this device (``activation_checkpointing_enabled``)."""
        super().initialize()
        if self.compile_step_networks_enabled():
            names = compile_step_networks(self._network(), self.print_to_log_file, self.compile_backend)
            self.print_to_log_file(f"Using torch.compile on {', '.join(names)} (nnUNet_compile=f turns it off); "
                                   f"a part torch cannot compile runs eagerly and the log says why.")
        else:
            decompile_step_networks(self._network())  # compiled for prediction by build_network_architecture
        blocks = [m for m in self._network().modules() if hasattr(m, "checkpoint_activations")]
        if blocks:
            enabled = self.activation_checkpointing_enabled()
            for module in blocks:
                module.checkpoint_activations = enabled
            self.print_to_log_file(
                f"Activation checkpointing {'on' if enabled else 'off'} ({self._checkpointing_policy()!r} on "
                f"{self.device.type}; {ACTIVATION_CHECKPOINTING_ENV}=always|cuda|never changes it): it costs one "
                f"more forward per step and saves activation memory; the model is the same either way.")

    def _checkpointing_policy(self) -> str:
        policy = read_setting(ACTIVATION_CHECKPOINTING_ENV) or self.activation_checkpointing
        if policy not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"{ACTIVATION_CHECKPOINTING_ENV}={policy!r}: must be one of {ACTIVATION_CHECKPOINTING}.")
        return policy

    def activation_checkpointing_enabled(self) -> bool:
        """Whether the network recomputes activations in backward on this trainer's device: on CUDA the planned
        patch and batch must fit the GPU nnU-Net planned for (without it Cross-Timestep needed 4.4x the stock
        trainer's memory, benchmarks/gpu/memory_gpu.md); on the CPU no such plan applies and it cost 1.7x time
        per iteration (benchmarks/profiles/)."""
        policy = self._checkpointing_policy()
        return policy == "always" or (policy == "cuda" and self.device.type == "cuda")

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # one output; a method that supervises its own layers does it in its loss (DSM)

    def _do_i_compile(self):
        # nnU-Net would compile the whole network (a reverse loop unrolled into one graph) and its Dice loss: we
        # compile the step networks instead, by the same switch (``compile_step_networks_enabled``)
        return False

    def compile_step_networks_enabled(self) -> bool:
        """nnU-Net's training switch, unchanged: ``nnUNet_compile`` (default on), never on the CPU, mps or Windows
        (nnU-Net logs why when asked for it there)."""
        return nnUNetTrainer._do_i_compile(self)

    @classmethod
    def compiled_for_prediction(cls, network: nn.Module) -> nn.Module:
        """``network`` with its step networks compiled where nnU-Net's predictor compiles (``nnUNet_compile`` set to
        true; off by default), as returned by ``build_network_architecture`` (every predictor's path). The trainer's
        ``initialize`` then applies the training switch instead."""
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            compile_step_networks(network, print, cls.compile_backend)
        return network

    def configure_optimizers(self):
        if self.optimizer_kind == "sgd":
            return super().configure_optimizers()
        if self.optimizer_kind != "adamw":
            raise ValueError(f"{self.__class__.__name__}.optimizer_kind must be 'sgd' or 'adamw', "
                             f"got {self.optimizer_kind!r}")
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr,
                                      weight_decay=self.adamw_weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---- training and per-epoch validation --------------------------------------------------------------------

    def training_loss(self, batch: dict):
        """(loss, the network's output, target (B, 1, *S) labels) of one batch, under autocast."""
        raise NotImplementedError  # abstract: the diffusion base and DSM define it (tests/trainers/test_mixin_order.py)

    def validation_scores(self, output) -> torch.Tensor:
        """(B, N, *S) class scores of ``output`` whose argmax is the per-epoch pseudo-Dice's segmentation."""
        raise NotImplementedError  # abstract: the diffusion base and DSM define it (tests/trainers/test_mixin_order.py)

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = self.training_loss(batch)
        self.backward_and_step(loss)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """Cheap per-epoch validation: the training loss and the pseudo-Dice of ``validation_scores`` (for a
        diffusion model the one-step estimate at a random t; the final validation runs the real sampler)."""
        with torch.no_grad():
            loss, output, target = self.training_loss(batch)
            counts = hard_dice_counts(self.validation_scores(output), target)
        return {"loss": loss.detach().cpu().numpy(), **counts}
