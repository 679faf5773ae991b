"""Class-prompt embeddings, computed once and stored with the preprocessed data.

``<nnUNet_preprocessed>/<dataset>/text_embeddings/<model>.pt`` holds the model name, the prompts and their
(N, D) embeddings. Training reads it and needs the text model only when the prompts (dataset.json) or the model
changed since; the trainer then puts the vectors into the network, so the checkpoint carries them and prediction
never needs the text model.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nnunet_diffusion.text.encoders import DEFAULT_TEXT_MODEL, TextModelError, load_text_encoder
from nnunet_diffusion.text.prompts import PROMPT_TEMPLATE, class_prompts

CACHE_FOLDER = "text_embeddings"


@dataclass(frozen=True)
class ClassTextEmbeddings:
    """model: the name as given (Hub id, folder or the default); prompts: N, in class order; vectors: (N, D)."""
    model: str
    prompts: tuple
    vectors: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def digest(self) -> str:
        """Identifies model + prompts (what decides the vectors), 12 hex digits."""
        return prompts_digest(self.model, self.prompts)

    def settings(self) -> dict:
        """What plans.json stores with the model (the vectors themselves live in the checkpoint)."""
        return {"model": self.model, "prompts": list(self.prompts), "dim": self.dim, "digest": self.digest}


def prompts_digest(model: str, prompts) -> str:
    return hashlib.sha256("\n".join([model, *prompts]).encode()).hexdigest()[:12]


def cache_path(folder: os.PathLike, model: str, template: str = PROMPT_TEMPLATE) -> Path:
    """One file per model and prompt template (methods with other templates do not overwrite each other's)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")).strip("_") or "model"
    if template != PROMPT_TEMPLATE:
        slug += "__" + hashlib.sha256(template.encode()).hexdigest()[:8]
    return Path(folder) / CACHE_FOLDER / f"{slug}.pt"


def class_text_embeddings(dataset_json: dict, folder: os.PathLike, model: str | None = None,
                          log: Callable[[str], None] = print, template: str = PROMPT_TEMPLATE) -> ClassTextEmbeddings:
    """The embeddings of dataset.json's class prompts with ``model`` (None: the offline default), from the cache in
    ``folder`` when it holds the same model and prompts, else computed (the text model is loaded) and cached.
    A cache made with other prompts is replaced, and ``log`` says what changed."""
    model = model or DEFAULT_TEXT_MODEL
    prompts = tuple(class_prompts(dataset_json, template))
    path = cache_path(folder, model, template)
    reason = f"there is no cache at {path}"
    if path.is_file():
        stored = _read_cache(path)
        if stored is None:
            reason = f"the cache {path} is truncated or corrupted"
            log(f"Text embeddings: {reason}: recomputing with {model}.")
        elif stored.get("model") == model and tuple(stored.get("prompts", ())) == prompts:
            log(f"Text embeddings: reusing {path} ({model}, {len(prompts)} prompts).")
            return ClassTextEmbeddings(model, prompts, stored["vectors"].float())
        else:
            changed = [f"'{old}' -> '{new}'" for old, new in zip(stored.get("prompts", ()), prompts) if old != new]
            reason = (f"the cache {path} was made for other prompts "
                      f"({'; '.join(changed) or 'number of classes'})")
            log(f"Text embeddings: the class prompts changed since {path} was made "
                f"({'; '.join(changed) or 'number of classes'}): recomputing with {model}.")
    try:
        vectors = load_text_encoder(model).embed(list(prompts))
    except TextModelError as error:
        raise TextModelError(f"The class-prompt embeddings must be computed ({reason}), but {error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")  # a killed write never leaves a truncated cache
    torch.save({"model": model, "prompts": list(prompts), "vectors": vectors}, partial)
    os.replace(partial, path)
    log(f"Text embeddings: computed with {model} ({len(prompts)} prompts, dim {vectors.shape[1]}), cached in {path}.")
    return ClassTextEmbeddings(model, prompts, vectors)


def _read_cache(path: Path) -> dict | None:
    """The cache's content, or None if it is unreadable or not what this module writes (then it is recomputed)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or corrupted (e.g. a copy cut short): remade, never trusted
        return None
    vectors = stored.get("vectors") if isinstance(stored, dict) else None
    if (not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or not torch.isfinite(vectors).all()
            or vectors.shape[0] != len(stored.get("prompts", ()))):
        return None
    return stored
