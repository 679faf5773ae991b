"""nnUNetTrainerTextDiffSeg: latent label diffusion conditioned on the image and on text descriptions of the
classes ("TextDiffSeg: Text-guided Latent Diffusion Model for 3d Medical Images Segmentation"; no public code,
the paper is the spec).

Text: one prompt per class from dataset.json (``text.prompts``), embedded once by a Hugging Face text model
(``NNUNET_DIFFUSION_TEXT_MODEL``: a Hub id or a folder; default the bundled offline all-MiniLM-L6-v2) and cached
with the preprocessed data. The vectors go into the network's ``text_embeddings`` buffer, so the checkpoint
carries them: prediction needs no text model. plans.json stores the model, the prompts and their digest.
"""
from __future__ import annotations


import torch
from torch import nn

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_diffusion.architectures.textdiffseg.network import TextDiffSegDenoiser
from nnunet_diffusion.architectures.textdiffseg.options import TextDiffSegOptions
from nnunet_diffusion.architectures.textdiffseg.segmenter import LatentDiffusionSegmenter
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.common.diffusion_base import PLANS_KEY, nnUNetTrainerDiffusionBase
from nnunet_diffusion.trainers.common.class_text import TEXT_KEY, ClassTextMixin
from nnunet_diffusion.trainers.common.pretraining_phase import PretrainingPhaseMixin

OPTIONS_KEY = "textdiffseg"  # the options' block inside plans.json's 'diffusion' block


class nnUNetTrainerTextDiffSeg(ClassTextMixin, PretrainingPhaseMixin, nnUNetTrainerDiffusionBase):
    """The full model. Ablations (Table II and more): ``variants_textdiffseg.py``."""

    noise_schedule = "linear"
    num_train_timesteps = 1000
    prediction = "eps"  # eq. 5
    default_sampler = SamplerSettings(kind="ddim", steps=10, num_samples=1, seed=0)  # the paper: DDIM, 10 steps
    options = TextDiffSegOptions()  # the network, its loss terms, the label autoencoder's training: options.py
    text_dim_without_text = 64      # width of the learned class tokens of the no-text ablation
    # eq. 4: L1 = CE + gamma Dice. The paper gives no gamma: 1, nnU-Net's equal weighting of CE and Dice. Eq. 6's
    # lambda (the eps MSE's weight) is stored with the model: options.eps_loss_weight
    dice_weight = 1.0
    # options.label_autoencoder_training = 'pretrained': the share of training the autoencoder trains alone
    label_autoencoder_pretrain_fraction = 0.2

    # ---- settings stored with the model ---------------------------------------------------------------------

    @classmethod
    def diffusion_settings(cls) -> dict:
        return {**super().diffusion_settings(), OPTIONS_KEY: cls.options.to_stored()}

    def dataset_settings(self, plans: dict, configuration: str, dataset_json: dict) -> dict:
        """The class prompts, the text model and the embeddings' size: checked and computed (or read from the cache
        beside the preprocessed data) now, before any folder is made."""
        num_classes = len([v for k, v in dataset_json["labels"].items() if k != "ignore"])
        capacity, needed = 2 ** self.options.latent_channels, max(1, (num_classes - 1).bit_length())
        if num_classes > capacity:
            name = self.__class__.__name__
            raise ValueError(
                f"{name}: {num_classes} classes are more than a {self.options.latent_channels}-channel label latent "
                f"can separate (at most {capacity}: one sign pattern per class). Train a subclass with "
                f"latent_channels = {needed}, e.g.\n"
                f"    class {name}_k{needed}({name}):\n"
                f"        options = dataclasses.replace({name}.options, latent_channels={needed})")
        if self.options.text_source != "prompts":
            return {TEXT_KEY: {"model": None, "dim": self.text_dim_without_text}}
        return {TEXT_KEY: self.compute_class_text(plans, dataset_json)}

    # ---- network --------------------------------------------------------------------------------------------

    @classmethod
    def build_denoiser(cls, configuration_manager, num_input_channels: int, num_classes: int,
                       stored: dict) -> nn.Module:
        if TEXT_KEY not in stored:
            raise ValueError(f"{cls.__name__}: plans.json has no '{PLANS_KEY}.{TEXT_KEY}' entry: this model folder "
                             f"was not trained by {cls.__name__} (or its plans.json was replaced).")
        options = TextDiffSegOptions.from_stored(stored[OPTIONS_KEY])
        return TextDiffSegDenoiser(num_input_channels, num_classes, **cls.plans_unet_kwargs(configuration_manager),
                                   text_dim=stored[TEXT_KEY]["dim"], latent_channels=options.latent_channels,
                                   latent_downsamplings=options.latent_downsamplings,
                                   label_features=options.label_autoencoder_features,
                                   image_branch=options.image_branch, text_fusion=options.text_fusion,
                                   label_encoder=options.label_encoder, text_source=options.text_source,
                                   freeze_label_autoencoder=options.label_autoencoder_training == "pretrained",
                                   patch_size=configuration_manager.patch_size)

    @classmethod
    def build_segmenter(cls, denoiser, schedule, sampler, stored: dict) -> nn.Module:
        options = TextDiffSegOptions.from_stored(stored.get(OPTIONS_KEY, {}))
        return LatentDiffusionSegmenter(denoiser, schedule, sampler, stored["prediction"],
                                        options.eps_loss_weight,
                                        options.segmentation_loss, options.denoised_latent, options.training_input,
                                        options.sampled_estimate)


    def text_buffer(self) -> torch.Tensor:
        return self._network().denoiser.text_embeddings

    # ---- loss (eqs. 4-6) ------------------------------------------------------------------------------------

    def _build_loss(self):
        """L1 (eq. 4): CE + gamma Dice on the decoded labels, nnU-Net's implementation (the segmenter's pass applies
        it to the decoded denoised latent and / or the decoded ground-truth latent: ``segmentation_loss``)."""
        return DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                               "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=self.dice_weight,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)

    # ---- the label autoencoder's pre-training phase (label_autoencoder_training = 'pretrained') ----------------

    pretrained_part_name = "the label autoencoder"

    def pretrained_part(self) -> nn.Module:
        return self._network().denoiser.label_autoencoder

    def pretraining(self) -> bool:
        return (self.options.label_autoencoder_training == "pretrained"
                and self.training_progress() < self.label_autoencoder_pretrain_fraction)

    def pretraining_loss(self, autoencoder: nn.Module, image: torch.Tensor, target: torch.Tensor):
        """The label autoencoder reconstructing the one-hot labels, with nnU-Net's Dice + CE."""
        onehot = torch.zeros((target.shape[0], self.label_manager.num_segmentation_heads, *target.shape[2:]),
                             device=self.device).scatter_(1, target.long(), 1)
        with self._autocast():
            logits = autoencoder(onehot)
            loss = self.loss(logits, target)
        x0_hat = torch.softmax(logits.float(), 1) * 2 - 1
        return loss, LatentPretrainingPass(x0_hat), target


class LatentPretrainingPass:
    """What the per-epoch validation needs from a step of the autoencoder's phase: its reconstruction in [-1, 1]."""

    def __init__(self, x0_hat: torch.Tensor):
        self.x0_hat = x0_hat
