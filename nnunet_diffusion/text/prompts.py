"""One prompt per class, from dataset.json.

A class's prompt is its description in dataset.json's ``label_descriptions`` ({label name: text}), or, when it
has none, ``PROMPT_TEMPLATE`` filled with the channel names (modality) and the label name (underscores as
spaces): "A T1 image of the frontal cortex." for channel 'T1' and label 'frontal_cortex'.
"""
from __future__ import annotations

import re

PROMPT_TEMPLATE = "A {modality} image of the {label}."
DESCRIPTIONS_KEY = "label_descriptions"
# label names that say nothing about the structure ('1', 'label_2', 'class 3', 'foreground'): a text encoder
# would embed the placeholder, not the class, so such a class needs a description
PLACEHOLDER_NAME = re.compile(r"(?:(?:label|class|structure|region|object|target|segment|roi|foreground)[ _-]*)?\d*",
                              re.IGNORECASE)


def is_placeholder_name(name: str) -> bool:
    return name.lower() != "background" and PLACEHOLDER_NAME.fullmatch(name.strip()) is not None


def class_names(dataset_json: dict) -> list[str]:
    """Label names ordered by their integer value (nnU-Net's class order, background first)."""
    labels = dataset_json["labels"]
    return [name for name, value in sorted(labels.items(), key=lambda item: item[1]) if name != "ignore"]


def modality(dataset_json: dict) -> str:
    """Channel names joined, e.g. 'T1' or 'T1 and FLAIR'."""
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    names = [str(channels[key]) for key in sorted(channels, key=lambda k: int(k))]
    return " and ".join(dict.fromkeys(names)) or "medical"


def class_prompts(dataset_json: dict, template: str = PROMPT_TEMPLATE) -> list[str]:
    """(N,) prompts in class order (``template`` with {modality} and {label} for classes without a description).
    Raises ValueError for an empty description, a description of a label that does
    not exist, or two classes with the same prompt (text could not tell them apart)."""
    names = class_names(dataset_json)
    descriptions = dataset_json.get(DESCRIPTIONS_KEY) or {}
    unknown = sorted(set(descriptions) - set(names))
    if unknown:
        raise ValueError(f"dataset.json '{DESCRIPTIONS_KEY}' describes {unknown}, which are not in 'labels' "
                         f"({names}). Use the label names as keys.")
    prompts = []
    for name in names:
        if name in descriptions:
            text = str(descriptions[name]).strip()
            if not text:
                raise ValueError(f"dataset.json '{DESCRIPTIONS_KEY}' has an empty description for '{name}'. Write "
                                 f"one sentence about the structure, or remove the entry to use the template "
                                 f"'{template}'.")
        elif is_placeholder_name(name):
            raise ValueError(
                f"dataset.json names class '{name}' with a placeholder, not what it is: text conditioning embeds "
                f"the class name, so it would learn nothing from it. Name the classes in 'labels' (e.g. "
                f"\"liver\": 1), or describe them in '{DESCRIPTIONS_KEY}' (e.g. \"{DESCRIPTIONS_KEY}\": "
                f"{{\"{name}\": \"A CT image of the liver.\"}}).")
        else:
            text = template.format(modality=modality(dataset_json), label=name.replace("_", " "))
        prompts.append(text)
    seen: dict[str, str] = {}
    for name, text in zip(names, prompts):
        if text.lower() in seen:
            raise ValueError(f"Classes '{seen[text.lower()]}' and '{name}' have the same prompt ('{text}'): text "
                             f"conditioning could not tell them apart. Give one of them its own description in "
                             f"dataset.json '{DESCRIPTIONS_KEY}'.")
        seen[text.lower()] = name
    return prompts
