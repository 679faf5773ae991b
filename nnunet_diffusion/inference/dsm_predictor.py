"""Prediction for DSM models with classes named at prediction time (``nnunet-diffusion predict --prompts``).

Beside each segmentation of the trained classes it writes, in ``<output>/dsm/``: ``<case>_anomaly`` (the anomaly
score of the organ queries, eq. 14, in [0, 1]; the background query left out; in stage 2 the organ queries as the
kMMM decoder leaves them, before the tumour queries mix in) and ``<case>_<name>`` per prompt
(``architectures.dsm.network.prompt_maps``), in the input's geometry. The prompts are embedded with the text
model the DSM model was trained with (plans.json), from the class names given, with DSM's template.
"""
from __future__ import annotations

import re

import torch

from nnunet_diffusion.architectures.dsm.network import prompt_maps
from nnunet_diffusion.inference.ensemble import stack_mirrored, unflip
from nnunet_diffusion.inference.predictor import DiffusionPredictor
from nnunet_diffusion.text.encoders import load_text_encoder
from nnunet_diffusion.text.prompts import modality

DSM_MAPS_FOLDER = "dsm"


def map_name(class_name: str) -> str:
    """A class name as a file-name suffix: 'Left kidney' -> 'left_kidney'."""
    return re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_") or "prompt"


class DSMPredictor(DiffusionPredictor):
    """DiffusionPredictor (batched mirroring, staged exports) whose maps are DSM's anomaly and prompt maps."""

    maps_folder = DSM_MAPS_FOLDER

    def __init__(self, *args, prompts=(), **kwargs):
        super().__init__(*args, **kwargs)
        if not prompts:
            raise ValueError("DSMPredictor needs at least one class name in --prompts")
        names = [map_name(p) for p in prompts]
        if len(set(names)) != len(names) or "anomaly" in names:
            raise ValueError(f"--prompts {list(prompts)}: give distinct class names (and none called 'anomaly'); "
                             f"their files are named {names}")
        self.class_names, self.prompt_text = list(prompts), None

    @property
    def map_names(self) -> tuple:
        return ("anomaly", *[map_name(p) for p in self.class_names])

    def initialize_from_trained_model_folder(self, *args, **kwargs):
        super().initialize_from_trained_model_folder(*args, **kwargs)
        from nnunet_diffusion.trainers.dsm.trainer import DSM_KEY, DSM_PROMPT_TEMPLATE
        settings = self.configuration_manager.configuration.get(DSM_KEY)
        if settings is None:
            raise ValueError("--prompts is for DSM models (nnUNetTrainerDSM, nnUNetTrainerDSMStage2 and variants).")
        text = settings.get("text")
        if not text:
            raise ValueError("This DSM model was trained without text alignment (a _noText variant): classes cannot "
                             "be named by prompts.")
        prompts = [DSM_PROMPT_TEMPLATE.format(modality=modality(self.dataset_json), label=name)
                   for name in self.class_names]
        vectors = load_text_encoder(text["model"]).embed(prompts)
        if vectors.shape[1] != text["dim"]:
            raise ValueError(f"The text model {text['model']} now gives embeddings of size {vectors.shape[1]}, the "
                             f"model was trained with size {text['dim']}: use the model it was trained with.")
        self.prompt_text = vectors.to(self.device)
        print(f"Prompts ({text['model']}): {prompts}")

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """(G, C_img, *P) windows -> (G, N + 1 + E, *P): logits and maps, each averaged over the mirrored copies."""
        combinations = self.mirror_combinations()
        copies, windows = len(combinations), x.shape[0]
        parts = [prompt_maps(self.unwrapped_network, part, self.prompt_text)
                 for part in torch.split(stack_mirrored(x, combinations), self.max_batch)]
        logits, maps = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        logits = unflip(logits.reshape(copies, windows, *logits.shape[1:]), combinations, extra_dims=1).mean(0)
        maps = unflip(maps.reshape(copies, windows, *maps.shape[1:]), combinations, extra_dims=1).mean(0)
        return torch.cat([logits, maps.to(logits.dtype)], dim=1)
