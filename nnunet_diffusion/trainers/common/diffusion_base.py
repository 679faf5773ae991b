"""nnU-Net glue shared by every diffusion trainer: build the segmenter from the plans, train and validate it.

A method is a subclass that sets a few class attributes (schedule, parametrisation, sampler defaults) or
overrides ``build_denoiser`` / ``diffusion_loss``. Everything else (planning, data loading, augmentation,
5-fold CV, checkpoints, sliding-window prediction, evaluation) is stock nnU-Net.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_diffusion.architectures.conditional_unet import ImageConditionedDenoiser
from nnunet_diffusion.architectures.segmenter import DiffusionSegmenter, TrainingPass
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import STAGED, SamplerSettings
from nnunet_diffusion.diffusion.schedules import make_schedule, respace
from nnunet_diffusion.trainers.common.data_checks import DataCheckError, check_stored_settings
from nnunet_diffusion.trainers.common.deep_supervision import with_deep_supervision
from nnunet_diffusion.trainers.common.package_base import nnUNetTrainerPackageBase

# key under plans['configurations'][<configuration>] that stores the diffusion settings with the trained model
PLANS_KEY = "diffusion"


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


class nnUNetTrainerDiffusionBase(nnUNetTrainerPackageBase):
    """Base class of all diffusion trainers. Not meant to be trained directly."""

    settings_key = PLANS_KEY

    noise_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_schedule_steps: int | None = None  # if set: betas over this many steps, respaced to num_train_timesteps
    prediction: str = "eps"          # 'eps' or 'x0' (x0: the denoiser returns class logits)
    recycling: bool = False
    clip_noisy_input: bool = False
    # nnU-Net's deep supervision of the decoder heads ('x0' models whose denoiser has the heads:
    # ``forward(..., all_scales=True)``, e.g. the recycling paper's U-Net); stored with the model
    deep_supervision: bool = False
    default_sampler = SamplerSettings(kind="ddim", steps=10, num_samples=1, seed=0)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = self.configuration_manager.configuration[PLANS_KEY]  # what model_settings stored
        if SamplerSettings.env_variables_set():
            self.print_to_log_file(
                f"{', '.join(f'{k}={v}' for k, v in SamplerSettings.env_variables_set().items())}: sampler "
                f"settings apply to the final validation and to prediction only, not to training. Training and "
                f"plans.json keep the stored settings ({self.sampler_from(settings, apply_env=False).describe()}); the "
                f"final validation samples with {self.sampler_from(settings).describe()}.")

    # ---- settings stored with the model ---------------------------------------------------------------------

    def model_settings(self, plans: dict, configuration: str, fold, dataset_json: dict) -> dict:
        """``training_settings`` and ``dataset_settings``, after checking the samplers of training and of the final
        validation (NNUNET_DIFFUSION_{SAMPLER,STEPS,SAMPLES,SEED} apply to the final validation and to prediction,
        not to training: both are checked now rather than after training)."""
        settings = self.training_settings()
        self.check_sampler(settings, self.sampler_from(settings, apply_env=False))
        try:
            self.check_sampler(settings, self.sampler_from(settings))
        except ValueError as error:
            raise ValueError(f"{error} ({', '.join(SamplerSettings.env_variables_set())} apply to the final "
                             f"validation and to prediction, not to training.)") from None
        return {**settings, **self.dataset_settings(plans, configuration, dataset_json)}

    @classmethod
    def diffusion_settings(cls) -> dict:
        return {"noise_schedule": cls.noise_schedule, "num_train_timesteps": cls.num_train_timesteps,
                "beta_schedule_steps": cls.beta_schedule_steps or cls.num_train_timesteps,
                "prediction": cls.prediction, "recycling": cls.recycling, "clip_noisy_input": cls.clip_noisy_input,
                "deep_supervision": cls.deep_supervision, "sampler": cls.default_sampler.to_dict()}

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

    @classmethod
    def build_denoiser(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                       num_classes: int, stored: dict) -> nn.Module:
        return ImageConditionedDenoiser(num_input_channels, num_classes, **cls.plans_unet_kwargs(configuration_manager))

    @classmethod
    def build_segmenter(cls, denoiser: nn.Module, schedule, sampler: SamplerSettings, stored: dict) -> nn.Module:
        return DiffusionSegmenter(denoiser, schedule, stored["prediction"], sampler,
                                  clip_noisy_input=stored["clip_noisy_input"], recycling=stored["recycling"],
                                  deep_supervision=stored["deep_supervision"])

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Called by nnU-Net for training and by its predictor: returns a segmenter whose eval forward samples.

        A classmethod (nnU-Net calls it on the class) so that subclasses change the network by attributes.
        """
        stored = cls.stored_settings(configuration_manager, model_plans_file(cls.__name__, plans_manager,
                                                                             configuration_manager))
        # the stored settings (plans.json) are the only input besides the plans' U-Net: a model rebuilds as trained
        denoiser = cls.build_denoiser(configuration_manager, num_input_channels, num_output_channels, stored)
        if stored["deep_supervision"] and not getattr(denoiser, "deep_supervision", False):
            # deliberate: deep supervision exists for the denoisers that keep their heads (ConcatImageDenoiser,
            # ImageConditionedDenoiser and CrossTimestepDenoiser); refuse it at start-up for any other
            raise NotImplementedError(f"{cls.__name__}: deep_supervision is set, but its denoiser "
                                      f"{type(denoiser).__name__} has no deep-supervision heads. Set "
                                      f"deep_supervision = False, or build a denoiser that keeps them "
                                      f"(deep_supervision=True, forward(..., all_scales=True)).")
        # the predictor's path: environment overrides apply, and a sampler the model was not trained for is
        # refused here, before the first case. The trainer resets its own network to the stored sampler.
        return cls.compiled_for_prediction(
            cls.build_segmenter(denoiser, cls.training_schedule(stored), cls.sampler_from(stored), stored))

    def initialize(self):
        """The package base's, then the stored sampler: build_network_architecture applied prediction-time
        overrides, training uses the stored one."""
        super().initialize()
        stored = self.stored_settings(self.configuration_manager)
        self._network().set_sampler(self.sampler_from(stored, apply_env=False))

    def perform_actual_validation(self, save_probabilities: bool = False):
        """The final validation samples as nnUNetv2_predict would: stored settings plus NNUNET_DIFFUSION_*."""
        stored = self.stored_settings(self.configuration_manager)
        self._network().set_sampler(self.sampler_from(stored))
        self.print_to_log_file(f"Final validation sampler: {self._network().sampler.describe()}")
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self._network().set_sampler(self.sampler_from(stored, apply_env=False))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        result = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # nnU-Net's predictor mirrors by calling the network once per flip: with a sampler inside, each call
        # is a whole reverse run. Keep the stock behaviour (and its --disable_tta switch) and say what it costs.
        n_flips = 2 ** len(result[3] or ())  # None: no mirroring
        self.print_to_log_file(f"Test-time mirroring runs the sampler {n_flips}x per window; "
                               f"nnUNetv2_predict --disable_tta runs it once.")
        return result

    # ---- training and per-epoch validation --------------------------------------------------------------------

    def diffusion_loss(self, result: TrainingPass, target: torch.Tensor) -> torch.Tensor:
        """eps models: MSE to the noise (Ho et al. 2020); x0 models: nnU-Net's Dice + CE on the logits (with deep
        supervision, on every head's: ``with_deep_supervision``). An auxiliary prior segmentation (APDS) adds nnU-Net's
        Dice + CE on its logits. A pass that carries its own loss (UniSegDiff's staged eq. 1, TextDiffSeg's eq. 6,
        Cross-Timestep's chain: ``loss(labels, segmentation_loss)``) uses it, with this trainer's Dice + CE as
        ``segmentation_loss``."""
        segmentation_loss = with_deep_supervision(self.loss)
        if hasattr(result, "loss"):
            return result.loss(target, segmentation_loss)
        if result.regression_target is not None:
            loss = torch.mean((result.output.float() - result.regression_target.float()) ** 2)
        else:
            loss = segmentation_loss([result.output, *result.lower_scale_logits] if result.lower_scale_logits
                                     else result.output, target)
        if result.prior_logits is not None:
            loss = loss + self.loss(result.prior_logits, target)
        return loss

    def training_loss(self, batch: dict):
        """(loss, the TrainingPass, target labels) of one batch: the network's training draw and its loss."""
        image, target = self._batch_on_device(batch)
        x0 = labels_to_x0(target, self.label_manager.num_segmentation_heads)
        with self._autocast():
            result = self.network(image, x0)
            loss = self.diffusion_loss(result, target)
        return loss, result, target

    def validation_scores(self, result) -> torch.Tensor:
        """The one-step mask estimate at the drawn t (x0_hat, (B, N, *S) in [-1, 1])."""
        return result.x0_hat
