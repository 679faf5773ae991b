"""nnU-Net glue shared by every diffusion trainer: build the segmenter from the plans, train and validate it.

A method is a subclass that sets a few class attributes (schedule, parametrisation, sampler defaults) or
overrides ``build_denoiser`` / ``diffusion_loss``. Everything else (planning, data loading, augmentation,
5-fold CV, checkpoints, sliding-window prediction, evaluation) is stock nnU-Net.
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

from nnunet_diffusion.architectures.conditional_unet import ImageConditionedDenoiser
from nnunet_diffusion.architectures.segmenter import DiffusionSegmenter, TrainingPass
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import STAGED, SamplerSettings
from nnunet_diffusion.diffusion.schedules import make_schedule, respace
from nnunet_diffusion.trainers.budget import TrainingBudgetMixin
from nnunet_diffusion.trainers.data_checks import DataCheckError, check_dataset_and_plans, check_stored_settings
from nnunet_diffusion.trainers.fault_safety import FaultSafetyMixin
from nnunet_diffusion.settings import read as read_setting

# key under plans['configurations'][<configuration>] that stores the diffusion settings with the trained model
PLANS_KEY = "diffusion"

# when the denoiser recomputes its activations in backward (``checkpoint_activations`` of its modules): 'cuda' only
# when training on a GPU, whose memory nnU-Net planned the patch and batch for; 'always'; 'never'. It trades one more
# forward per checkpointed block for memory and never changes the model (losses and gradients are equal: tested)
ACTIVATION_CHECKPOINTING = ("cuda", "always", "never")
ACTIVATION_CHECKPOINTING_ENV = "NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING"


def model_plans_file(trainer_name: str, plans_manager, configuration_manager) -> str:
    """Where a trained model's plans.json lives (nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>), for
    messages about it; the configuration is found by its content (the manager does not know its name)."""
    if plans_manager is None:
        return "plans.json"
    plans = plans_manager.plans
    names = [n for n in plans.get("configurations", {})
             if plans_manager.get_configuration(n).configuration == configuration_manager.configuration]
    folder = f"{trainer_name}__{plans.get('plans_name')}__{names[0] if names else '<configuration>'}"
    return os.path.join("nnUNet_results", str(plans.get("dataset_name")), folder, "plans.json")


class nnUNetTrainerDiffusionBase(FaultSafetyMixin, TrainingBudgetMixin, nnUNetTrainer):
    """Base class of all diffusion trainers. Not meant to be trained directly."""

    settings_key = PLANS_KEY

    noise_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_schedule_steps: int | None = None  # if set: betas over this many steps, respaced to num_train_timesteps
    prediction: str = "eps"          # 'eps' or 'x0' (x0: the denoiser returns class logits)
    recycling: bool = False
    clip_noisy_input: bool = False
    default_sampler = SamplerSettings(kind="ddim", steps=10, num_samples=1, seed=0)
    # chosen by measurement (benchmarks/optimizers/): 'adamw' (the denoisers' usual: Diff-UNet, MedSegDiff,
    # ImgX-DiffSeg) learned as well as or better than nnU-Net's 'sgd' (Nesterov, momentum 0.99, lr 1e-2) for
    # every diffusion trainer at an equal budget; both with nnU-Net's poly decay. Variants: <trainer>_SGD
    optimizer_kind: str = "adamw"
    learning_rate: float | None = 1e-3  # None: nnU-Net's initial_lr (1e-2)
    adamw_weight_decay: float = 1e-2
    # one of ACTIVATION_CHECKPOINTING; NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING overrides it at training
    activation_checkpointing: str = "cuda"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # fail now, before any folder is made (and not hours later), on data or settings we cannot handle
        check_dataset_and_plans(self.__class__.__name__, plans, configuration, dataset_json)
        settings = self.training_settings()
        # training uses these settings only; NNUNET_DIFFUSION_{SAMPLER,STEPS,SAMPLES,SEED} apply to the final
        # validation and to prediction: check both samplers now rather than after training
        self.check_sampler(settings, self.sampler_from(settings, apply_env=False))
        try:
            self.check_sampler(settings, self.sampler_from(settings))
        except ValueError as error:
            raise ValueError(f"{error} ({', '.join(SamplerSettings.env_variables_set())} apply to the final "
                             f"validation and to prediction, not to training.)") from None
        self._checkpointing_policy()  # a bad NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING fails here, not after planning
        plans = copy.deepcopy(plans)
        if configuration in plans.get("configurations", {}):
            # stored with the model: on_train_start copies these plans into the results folder
            plans["configurations"][configuration][PLANS_KEY] = {
                **settings, **self.dataset_settings(plans, configuration, dataset_json)}
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        if self.learning_rate is not None:
            self.initial_lr = self.learning_rate
        if SamplerSettings.env_variables_set():
            self.print_to_log_file(
                f"{', '.join(f'{k}={v}' for k, v in SamplerSettings.env_variables_set().items())}: sampler "
                f"settings apply to the final validation and to prediction only, not to training. Training and "
                f"plans.json keep the stored settings ({self.sampler_from(settings, apply_env=False).describe()}); the "
                f"final validation samples with {self.sampler_from(settings).describe()}.")

    # ---- settings stored with the model ---------------------------------------------------------------------

    @classmethod
    def diffusion_settings(cls) -> dict:
        return {"noise_schedule": cls.noise_schedule, "num_train_timesteps": cls.num_train_timesteps,
                "beta_schedule_steps": cls.beta_schedule_steps or cls.num_train_timesteps,
                "prediction": cls.prediction, "recycling": cls.recycling, "clip_noisy_input": cls.clip_noisy_input,
                "sampler": cls.default_sampler.to_dict()}

    @classmethod
    def training_settings(cls) -> dict:
        """What a training run uses and stores: the class's settings plus training-time variables of subclasses
        (read here only, never at prediction, where the stored values count)."""
        return cls.diffusion_settings()

    def dataset_settings(self, plans: dict, configuration: str, dataset_json: dict) -> dict:
        """Settings that depend on the dataset (e.g. TextDiffSeg's class prompts), stored with the model beside
        ``training_settings``; called before nnU-Net's __init__, so it may raise on bad input before any folder
        is made."""
        return {}

    @classmethod
    def stored_settings(cls, configuration_manager: ConfigurationManager, where: str = "plans.json") -> dict:
        """Settings the model was trained with (plans.json), falling back to the class defaults. A hand-edited block
        that this trainer cannot use raises a DataCheckError naming ``where`` (the file) and the bad entry."""
        block = configuration_manager.configuration.get(PLANS_KEY, {})
        where = f"{where}, '{PLANS_KEY}' block"
        check_stored_settings(block, cls.diffusion_settings(), where, cls.extra_settings_keys)
        stored = {**cls.diffusion_settings(), **block}
        try:  # values: the schedule, the parametrisation and the sampler
            if stored["prediction"] not in ("eps", "x0"):
                raise ValueError(f"prediction must be 'eps' or 'x0', not {stored['prediction']!r}")
            cls.training_schedule(stored)
            SamplerSettings(**stored["sampler"]).validated(stored["num_train_timesteps"])
        except (ValueError, TypeError) as error:
            raise DataCheckError(f"{where}: {error}. This block is written by the trainer and stored with the model; "
                                 f"restore the plans.json the model was trained with, or train again.") from None
        return stored

    @classmethod
    def staged_sampler(cls) -> bool:
        """Whether this trainer's default sampler is UniSegDiff's staged one."""
        return cls.default_sampler.kind == STAGED

    @staticmethod
    def sampler_from(settings: dict, apply_env: bool = True) -> SamplerSettings:
        """The stored sampler settings, with NNUNET_DIFFUSION_{SAMPLER,STEPS,SAMPLES,SEED} applied if ``apply_env``
        (prediction and the final validation; never training), validated against T. Whether the model was trained
        on the timesteps it visits is the segmenter's check (``check_sampler``)."""
        sampler = SamplerSettings(**settings["sampler"])
        sampler = sampler.with_env_overrides() if apply_env else sampler
        return sampler.validated(settings["num_train_timesteps"])

    @staticmethod
    def training_schedule(settings: dict):
        return respace(make_schedule(settings["noise_schedule"], settings["beta_schedule_steps"]),
                       settings["num_train_timesteps"])

    @classmethod
    def check_sampler(cls, settings: dict, sampler: SamplerSettings) -> None:
        """Raise, naming the valid choices, if a model trained with ``settings`` cannot sample with ``sampler``.
        The segmenter these settings build does the check (``set_sampler``); it needs no network for it."""
        cls.build_segmenter(nn.Identity(), cls.training_schedule(settings), sampler, settings)

    # ---- network --------------------------------------------------------------------------------------------

    @staticmethod
    def plans_unet_kwargs(configuration_manager: ConfigurationManager) -> dict:
        """The plans' U-Net arguments (stages, features, kernels, strides, norm) with classes imported."""
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        for key in configuration_manager.network_arch_init_kwargs_req_import:
            if kwargs.get(key) is not None:
                kwargs[key] = pydoc.locate(kwargs[key])
        if "n_blocks_per_stage" in kwargs:  # ResEnc plans: use as many plain convs as the plan has blocks
            kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
        kwargs.pop("deep_supervision", None)
        return kwargs

    @classmethod
    def build_denoiser(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                       num_classes: int) -> nn.Module:
        return ImageConditionedDenoiser(num_input_channels, num_classes, **cls.plans_unet_kwargs(configuration_manager))

    @classmethod
    def build_segmenter(cls, denoiser: nn.Module, schedule, sampler: SamplerSettings, stored: dict) -> nn.Module:
        return DiffusionSegmenter(denoiser, schedule, stored["prediction"], sampler,
                                  clip_noisy_input=stored["clip_noisy_input"], recycling=stored["recycling"])

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Called by nnU-Net for training and by its predictor: returns a segmenter whose eval forward samples.

        A classmethod (nnU-Net calls it on the class) so that subclasses change the network by attributes.
        """
        stored = cls.stored_settings(configuration_manager, model_plans_file(cls.__name__, plans_manager,
                                                                             configuration_manager))
        denoiser = cls.build_denoiser(configuration_manager, num_input_channels, num_output_channels)
        # the predictor's path: environment overrides apply, and a sampler the model was not trained for is
        # refused here, before the first case. The trainer resets its own network to the stored sampler.
        return cls.build_segmenter(denoiser, cls.training_schedule(stored), cls.sampler_from(stored), stored)

    def _segmenter(self) -> DiffusionSegmenter:
        network = self.network.module if self.is_ddp else self.network
        return getattr(network, "_orig_mod", network)

    def initialize(self):
        """nnU-Net's, then the stored sampler (build_network_architecture applied prediction-time overrides) and
        the activation checkpointing for this device (``activation_checkpointing_enabled``)."""
        super().initialize()
        stored = self.stored_settings(self.configuration_manager)
        self._segmenter().set_sampler(self.sampler_from(stored, apply_env=False))
        blocks = [m for m in self._segmenter().modules() if hasattr(m, "checkpoint_activations")]
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
        """Whether the denoiser recomputes activations in backward on this trainer's device: on CUDA the planned
        patch and batch must fit the GPU nnU-Net planned for (without it Cross-Timestep needed 4.4x the stock
        trainer's memory, benchmarks/gpu/memory_gpu.md); on the CPU no such plan applies and it cost 1.7x time
        per iteration (benchmarks/profiles/)."""
        policy = self._checkpointing_policy()
        return policy == "always" or (policy == "cuda" and self.device.type == "cuda")

    def perform_actual_validation(self, save_probabilities: bool = False):
        """The final validation samples as nnUNetv2_predict would: stored settings plus NNUNET_DIFFUSION_*."""
        stored = self.stored_settings(self.configuration_manager)
        self._segmenter().set_sampler(self.sampler_from(stored))
        self.print_to_log_file(f"Final validation sampler: {self._segmenter().sampler.describe()}")
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self._segmenter().set_sampler(self.sampler_from(stored, apply_env=False))

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # the denoiser has a single output; deep supervision is always off

    def _do_i_compile(self):
        return False  # the reverse loop and training pass are not plain forwards; compile gains nothing here

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        result = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # nnU-Net's predictor mirrors by calling the network once per flip: with a sampler inside, each call
        # is a whole reverse run. Keep the stock behaviour (and its --disable_tta switch) and say what it costs.
        n_flips = 2 ** len(result[3] or ())  # None: no mirroring
        self.print_to_log_file(f"Test-time mirroring runs the sampler {n_flips}x per window; "
                               f"nnUNetv2_predict --disable_tta runs it once.")
        return result

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

    def diffusion_loss(self, result: TrainingPass, target: torch.Tensor) -> torch.Tensor:
        """eps models: MSE to the noise (Ho et al. 2020); x0 models: nnU-Net's Dice + CE on the logits.
        An auxiliary prior segmentation (APDS) adds nnU-Net's Dice + CE on its logits. A pass that carries its own
        loss (UniSegDiff's staged eq. 1, TextDiffSeg's eq. 6: ``loss(labels, segmentation_loss)``) uses it, with
        this trainer's Dice + CE as ``segmentation_loss``."""
        if hasattr(result, "loss"):
            return result.loss(target, self.loss)
        if result.regression_target is not None:
            loss = torch.mean((result.output.float() - result.regression_target.float()) ** 2)
        else:
            loss = self.loss(result.output, target)
        if result.prior_logits is not None:
            loss = loss + self.loss(result.prior_logits, target)
        return loss

    def _training_pass(self, batch: dict):
        image, target = self._batch_on_device(batch)
        x0 = labels_to_x0(target, self.label_manager.num_segmentation_heads)
        with self._autocast():
            result = self.network(image, x0)
            loss = self.diffusion_loss(result, target)
        return loss, result, target

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = self._training_pass(batch)
        self.backward_and_step(loss)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """Cheap per-epoch validation: the training loss and the pseudo-Dice of the one-step mask estimate at a
        random t (no reverse run; the final validation after training uses the real sampler)."""
        with torch.no_grad():
            loss, result, target = self._training_pass(batch)
        segmentation = result.x0_hat.argmax(1, keepdim=True)
        onehot = torch.zeros_like(result.x0_hat).scatter_(1, segmentation, 1)
        axes = [0] + list(range(2, onehot.ndim))
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=axes)
        # [1:] drops the background class, as the stock trainer does
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp.detach().cpu().numpy()[1:],
                "fp_hard": fp.detach().cpu().numpy()[1:], "fn_hard": fn.detach().cpu().numpy()[1:]}
