"""DSM as nnU-Net trainers ("Unleashing Diffusion and State Space Models for Medical Image Segmentation"):
``nnUNetTrainerDSM`` trains stage 1
(organ queries with the kMMM decoder), ``nnUNetTrainerDSMStage2`` stage 2 (tumour queries with the anomaly mask
prompt and diffusion-guided refinement) from stage 1's checkpoint in nnUNet_results.

Which classes are 'tumours' (learned by stage 2's queries) and which 'organs' (stage 1's; background is one):
dataset.json's ``dsm_tumour_labels`` (label names), or NNUNET_DIFFUSION_DSM_TUMOUR_LABELS (comma-separated) at
training. Stage 1 is trained on the organ classes only: the partial-label loss covers the classes a stage has
queries for, so tumour voxels are simply no organ's (they are the anomalies stage 2 learns from).

Background keeps a query of its own (nnU-Net's label 0 needs a segmentation channel), but the anomaly score (eq. 14)
is the negative max over the other organ queries only (``architectures.dsm.anomaly``). Stage 2 keeps stage 1's loss
on the organ masks the kMMM decoder gives (the anomaly score's source, before the tumour queries mix in) and trains at
a tenth of stage 1's learning rate.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_diffusion.architectures.dsm.backbone import SwinUNETRPixelDecoder
from nnunet_diffusion.architectures.dsm.network import DSMNetwork, DSMStage2Network
from nnunet_diffusion.architectures.dsm.options import DSMOptions
from nnunet_diffusion.settings import read as read_setting
from nnunet_diffusion.text.prompts import class_names
from nnunet_diffusion.trainers.common.class_text import TEXT_KEY, ClassTextMixin
from nnunet_diffusion.trainers.common.package_base import nnUNetTrainerPackageBase
from nnunet_diffusion.trainers.common.pretrained_condition import read_condition_checkpoint, stock_checkpoint_path

DSM_KEY = "dsm"
TUMOUR_LABELS_KEY = "dsm_tumour_labels"
ENV_TUMOUR_LABELS = "NNUNET_DIFFUSION_DSM_TUMOUR_LABELS"
# plans.json 'anomaly': eq. 14 over the organ queries without the background's, from the kMMM organ queries (stage 2:
# before they mix); absent in older models, which keep the max over all organ queries they were trained with
ANOMALY_ORGAN_QUERIES = "organ_queries"
# DSM's prompt (sec. 4.2.3) with the modality from the channel names
DSM_PROMPT_TEMPLATE = "A {modality} scan of a {label}."


def tumour_labels(dataset_json: dict) -> list[str]:
    """The label names stage 2 learns: NNUNET_DIFFUSION_DSM_TUMOUR_LABELS, else dataset.json's dsm_tumour_labels."""
    from_env = read_setting(ENV_TUMOUR_LABELS)
    names = [n.strip() for n in from_env.split(",") if n.strip()] if from_env else \
        list(dataset_json.get(TUMOUR_LABELS_KEY, []))
    known = class_names(dataset_json)
    wrong = [n for n in names if n not in known or n == "background"]
    if wrong:
        raise ValueError(f"Tumour labels {wrong} ({ENV_TUMOUR_LABELS} or dataset.json '{TUMOUR_LABELS_KEY}') are not "
                         f"foreground labels of this dataset ({known[1:]}). Name foreground labels of dataset.json.")
    return names


class nnUNetTrainerDSM(ClassTextMixin, nnUNetTrainerPackageBase):
    """Stage 1: organ queries (one per organ class and background), kMMM decoder, text-aligned classes."""

    stage = 1
    options = DSMOptions()  # the query decoder, the backbone, stage 2's blocks: architectures/dsm/options.py
    prompt_template = DSM_PROMPT_TEMPLATE
    settings_key = DSM_KEY
    # deep supervision of every kMMM layer's response (kMaX-DeepLab supervises its cluster logits): weight of their
    # mean beside the final masks' loss; and of the query classification (eq. 20), both our choice (the paper's
    # loss weights are not given)
    response_loss_weight = 0.5
    class_loss_weight = 0.1
    learning_rate = 1e-3     # AdamW, as the paper (its value is not legible); nnU-Net's poly decay

    def model_settings(self, plans: dict, configuration: str, fold, dataset_json: dict) -> dict:
        """The 'dsm' block: stage, which classes are organs and tumours, the decoder's settings and the class text;
        stage 2 also finds and reads stage 1's checkpoint here (before any folder is made)."""
        if self.options.backbone == "swin_unetr":
            SwinUNETRPixelDecoder.check_patch(plans["configurations"][configuration]["patch_size"])
        names = class_names(dataset_json)
        tumours = tumour_labels(dataset_json)
        settings = {"stage": self.stage, "organ_classes": [i for i, n in enumerate(names) if n not in tumours],
                    "tumour_classes": [names.index(n) for n in tumours], **self.options.to_stored(),
                    "anomaly": ANOMALY_ORGAN_QUERIES,
                    TEXT_KEY: self.compute_class_text(plans, dataset_json) if self.options.text_alignment else None}
        self.stage1_weights = self.find_stage1_weights(plans, configuration, fold)
        return {**settings, **self.stage_settings()}

    def stage_settings(self) -> dict:
        return {}

    def find_stage1_weights(self, plans: dict, configuration: str, fold):
        return None

    # ---- network --------------------------------------------------------------------------------------------

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        settings = configuration_manager.configuration.get(DSM_KEY)
        if settings is None:
            raise ValueError(f"{cls.__name__}: plans.json has no '{DSM_KEY}' entry: this model folder was not "
                             f"trained by a DSM trainer.")
        kwargs = cls.plans_unet_kwargs(configuration_manager)
        text = settings.get(TEXT_KEY)
        options = DSMOptions.from_stored(settings)
        legacy = settings.get("anomaly") != ANOMALY_ORGAN_QUERIES  # a model from before: as it was trained
        stage1 = DSMNetwork(num_input_channels, num_output_channels, settings["organ_classes"],
                            text_dim=text["dim"] if options.text_alignment else None, dim=options.query_dim,
                            max_layers=options.max_kmmm_layers, kmeans=options.kmeans, ssm_state=options.ssm_state,
                            min_output_stride=options.min_output_stride,
                            backbone=options.backbone,
                            legacy_anomaly=legacy, **kwargs)
        if settings["stage"] == 1:
            return cls.compiled_for_prediction(stage1)
        return cls.compiled_for_prediction(DSMStage2Network(stage1, settings["tumour_classes"], kwargs["conv_op"],
                                                            amvp=options.amvp, dqr=options.dqr, legacy_anomaly=legacy))

    def text_buffer(self) -> torch.Tensor:
        network = self._network()
        return (network.stage1 if isinstance(network, DSMStage2Network) else network).text_embeddings

    # ---- loss ---------------------------------------------------------------------------------------------------

    def _build_loss(self):
        """Dice + BCE on each query's sigmoid mask (eqs. 11-13), nnU-Net's implementation."""
        return DC_and_BCE_loss({}, {"batch_dice": self.configuration_manager.batch_dice, "do_bg": True,
                                    "smooth": 1e-5, "ddp": self.is_ddp}, dice_class=MemoryEfficientSoftDiceLoss)

    def trained_classes(self) -> list:
        """The classes this stage has queries for, in query order (the partial-label loss covers these only)."""
        settings = self.configuration_manager.configuration[DSM_KEY]
        return settings["organ_classes"] + (settings["tumour_classes"] if self.stage == 2 else [])

    def dsm_loss(self, output, target: torch.Tensor) -> torch.Tensor:
        """output: DSMOutput; target (B, 1, *S) labels. Masks of the trained classes, every kMMM layer's organ
        responses against the labels at its scale, each query's class against its own (eq. 20), and in stage 2 the
        kMMM organ masks before the tumour queries mix in (stage 1's mask loss: they give the anomaly map)."""
        classes = self.trained_classes()
        onehot = F.one_hot(target[:, 0].long(), self.label_manager.num_segmentation_heads)
        onehot = onehot.movedim(-1, 1).float()  # (B, N, *S)
        loss = self.loss(output.logits[:, classes], onehot[:, classes])
        organs = self.configuration_manager.configuration[DSM_KEY]["organ_classes"]
        response_losses = [self.loss(response, F.interpolate(onehot[:, organs], size=response.shape[2:],
                                                             mode="nearest"))
                           for response in output.responses]
        loss = loss + self.response_loss_weight * torch.stack(response_losses).mean()
        if self.stage == 2:  # stage 1's loss on the kMMM organ masks, eq. 14's source in stage 2, stays
            loss = loss + self.loss(output.organ_masks, onehot[:, organs])
        query_targets = torch.tensor(classes, device=target.device).repeat(target.shape[0])
        class_loss = F.cross_entropy(output.class_logits.flatten(0, 1).float(), query_targets)
        return loss + self.class_loss_weight * class_loss

    def training_loss(self, batch: dict):
        """(the DSM loss, the DSMOutput, target labels) of one batch; the query decoder's layers are supervised
        here (``dsm_loss``), not by nnU-Net's deep supervision."""
        image, target = self._batch_on_device(batch)
        with self._autocast():
            output = self.network(image, full=True)
            loss = self.dsm_loss(output, target)
        return loss, output, target

    def validation_scores(self, output) -> torch.Tensor:
        return output.logits


class nnUNetTrainerDSMStage2(nnUNetTrainerDSM):
    """Stage 2: stage 1's network (loaded from ``stage1_trainer``'s checkpoint_final.pth of the same dataset, plans,
    configuration and fold in nnUNet_results) plus tumour queries refined with AMVP and DQR, fine-tuned together."""

    stage = 2
    stage1_trainer = "nnUNetTrainerDSM"
    # the paper: "(2) Stage 2: We utilize the pretrained model from Stage 1, while setting the initial learning rate
    # to ." (both stages' values are lost in our copy; the reference code's train.py defaults to 1e-4 for either):
    # a tenth of stage 1's, our ratio, so fine-tuning with the tumour queries moves the organ queries less
    learning_rate = 1e-4  # nnUNetTrainerDSM.learning_rate / 10

    def stage_settings(self) -> dict:
        return {"stage1_trainer": self.stage1_trainer}

    def find_stage1_weights(self, plans: dict, configuration: str, fold):
        results = os.environ.get("nnUNet_results")
        if not results:
            raise ValueError("nnUNet_results is not set: stage 2 reads stage 1's model from there.")
        path = stock_checkpoint_path(results, plans["dataset_name"], plans["plans_name"], configuration, fold,
                                     self.stage1_trainer)
        self.stage1_checkpoint = path
        return read_condition_checkpoint(path, plans["dataset_name"], plans["plans_name"], configuration, fold,
                                         trainer=self.stage1_trainer, what=f"{self.__class__.__name__} (stage 2)")

    def initialize(self):
        super().initialize()
        if self.stage1_weights is None:
            return
        stage1 = self._network().stage1
        try:
            stage1.load_state_dict(self.stage1_weights, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{self.stage1_checkpoint} does not fit this stage-2 model (other classes, text model or "
                             f"settings?): {str(error).splitlines()[0]}. Train stage 1 again with this dataset.json: "
                             f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} {self.fold} "
                             f"-tr {self.stage1_trainer}") from None
        if self.class_embeddings is not None:
            self.text_buffer().copy_(self.class_embeddings.vectors)  # this run's prompts, as stage 1 saw them or newer
        self.stage1_weights = None

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"Stage 1 weights: {self.stage1_checkpoint}")
