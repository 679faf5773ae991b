"""Class prompts for text-conditioned trainers (TextDiffSeg, DSM): computed or read from the cache at trainer start
(before any folder is made), stored in plans.json, copied into the network's ``text_embeddings`` buffer (so the
checkpoint carries them and prediction needs no text model), and checked when a checkpoint is resumed."""
from __future__ import annotations

import os

import torch

from nnunet_diffusion.planning.text_embeddings import class_text_embeddings
from nnunet_diffusion.settings import read as read_setting
from nnunet_diffusion.text.encoders import ENV_TEXT_MODEL
from nnunet_diffusion.text.prompts import PROMPT_TEMPLATE
from nnunet_diffusion.trainers.common.fault_safety import read_checkpoint

TEXT_KEY = "text"


class ClassTextMixin:
    """For nnUNetTrainer subclasses. ``settings_key``: where in plans['configurations'][c] the method's settings
    (with their ``text`` entry) live; ``text_buffer()``: the network's (N, D) buffer for the vectors."""

    prompt_template = PROMPT_TEMPLATE
    settings_key: str
    class_embeddings = None

    def text_buffer(self) -> torch.Tensor:
        raise NotImplementedError  # abstract: every trainer using the mixin defines it

    def compute_class_text(self, plans: dict, dataset_json: dict) -> dict:
        """The ``text`` settings: model, prompts, size and digest. Loads the text model only when the cache beside the
        preprocessed data lacks these prompts; a model that cannot be loaded raises TextModelError with the fix."""
        from nnunetv2.paths import nnUNet_preprocessed
        self._text_log: list[str] = []
        preprocessed = os.environ.get("nnUNet_preprocessed") or nnUNet_preprocessed
        if not preprocessed:
            raise ValueError("nnUNet_preprocessed is not set: the text embeddings are cached beside the "
                             "preprocessed data. Export it as for nnUNetv2_plan_and_preprocess.")
        self.class_embeddings = class_text_embeddings(
            dataset_json, os.path.join(preprocessed, plans["dataset_name"]),
            read_setting(ENV_TEXT_MODEL), log=self._text_log.append,
            template=self.prompt_template)
        return self.class_embeddings.settings()

    def _text_settings(self, plans: dict) -> dict | None:
        try:
            return plans["configurations"][self.configuration_name][self.settings_key][TEXT_KEY]
        except (KeyError, TypeError):
            return None

    def initialize(self):
        super().initialize()
        if self.class_embeddings is not None:
            self.text_buffer().copy_(self.class_embeddings.vectors)

    def on_train_start(self):
        super().on_train_start()
        for line in getattr(self, "_text_log", []):
            self.print_to_log_file(line)
        text = self._text_settings(self.plans_manager.plans) or {}
        if text.get("model"):
            self.print_to_log_file(f"Class prompts ({text['model']}, dim {text['dim']}): {text['prompts']}")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, after checking that the checkpoint's text embeddings fit this run's: another size stops here
        with the fix; other prompts or another model of the same size are said, and this run's embeddings used."""
        checkpoint = (read_checkpoint(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str)
                      else filename_or_checkpoint)
        current = self._text_settings(self.plans_manager.plans) or {}
        trained = self._text_settings(checkpoint.get("init_args", {}).get("plans", {}))
        if trained is not None and trained.get("dim") != current.get("dim"):
            raise ValueError(
                f"The checkpoint was trained with text embeddings of size {trained.get('dim')} "
                f"({trained.get('model')}); this run's text model gives size {current.get('dim')} "
                f"({current.get('model')}). Resume with the same model ({ENV_TEXT_MODEL}={trained.get('model')}), "
                f"or start a new training (without --c) for the new model.")
        super().load_checkpoint(filename_or_checkpoint)  # nnU-Net 2.8 loads only from a file name
        if trained is not None and self.class_embeddings is not None and trained.get("digest") != current["digest"]:
            self.print_to_log_file(f"Text: the prompts or the text model changed since the checkpoint "
                                   f"({trained.get('model')}: {trained.get('prompts')} -> {current['model']}: "
                                   f"{current['prompts']}); training continues with the new embeddings.")
            self.text_buffer().copy_(self.class_embeddings.vectors)
