"""The one registry of the NNUNET_DIFFUSION_* environment variables: name, type, when it applies, default, help.

Every reader in the package reads through ``read`` (an unregistered name is a programming error), so this table is
the whole list; ``nnunet-diffusion settings`` prints it and docs/reference/settings.md is generated from it
(``markdown_table``; a test fails when the page and the registry differ).

    NNUNET_DIFFUSION_STEPS=5 nnUNetv2_predict ...      # a prediction-time override, checked against the model
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

TRAINING, PREDICTION, BOTH = "training", "prediction", "training and prediction"


@dataclass(frozen=True)
class Variable:
    """One environment variable. kind: what its value is, in words; applies: TRAINING, PREDICTION or BOTH;
    default: what unset means."""
    name: str
    kind: str
    applies: str
    default: str
    help: str


VARIABLES = {v.name: v for v in [
    # run length (trainers/common/budget.py): any trainer, the stock one included through nnUNetTrainerBudget
    Variable("NNUNET_DIFFUSION_EPOCHS", "whole number > 0", TRAINING, "nnU-Net's 1000", "number of epochs"),
    Variable("NNUNET_DIFFUSION_ITERATIONS", "whole number > 0", TRAINING, "nnU-Net's 250",
             "training iterations per epoch"),
    Variable("NNUNET_DIFFUSION_VAL_ITERATIONS", "whole number > 0", TRAINING, "nnU-Net's 50",
             "validation iterations per epoch"),
    Variable("NNUNET_DIFFUSION_SAVE_EVERY", "whole number > 0", TRAINING, "nnU-Net's 50",
             "write checkpoint_latest every this many epochs: what a kill loses at most, what --c resumes from"),
    Variable("NNUNET_DIFFUSION_TIME_BUDGET", "seconds > 0", TRAINING, "none",
             "wall-clock seconds of training; the learning rate anneals over the budget; --c continues it"),
    Variable("NNUNET_DIFFUSION_FINAL_VALIDATION", "0 or 1", TRAINING, "1", "0 skips the fold's final validation"),
    Variable("NNUNET_DIFFUSION_MIRROR_AXES", "'none' or comma-separated axes", BOTH, "nnU-Net's (every axis)",
             "mirroring axes of training augmentation and of test-time mirroring (stored in the checkpoint)"),
    # the sampler (diffusion/samplers.py): stored with the model, overridden at the final validation and prediction
    Variable("NNUNET_DIFFUSION_SAMPLER", "ddim, ddpm or staged", PREDICTION, "the model's stored sampler",
             "reverse-process kind"),
    Variable("NNUNET_DIFFUSION_STEPS", "whole number > 0", PREDICTION, "the model's stored sampler",
             "reverse steps; refused with the valid choices when the model never trained those timesteps"),
    Variable("NNUNET_DIFFUSION_SAMPLES", "whole number > 0", PREDICTION, "the model's stored sampler",
             "samples per window, fused"),
    Variable("NNUNET_DIFFUSION_SEED", "whole number", PREDICTION, "the model's stored sampler",
             "seed of the sampler's noise"),
    Variable("NNUNET_DIFFUSION_FUSION", "mean or staple", PREDICTION, "the model's stored sampler",
             "how the samples are fused"),
    # training-only method settings, stored with the model
    Variable("NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING", "cuda, always or never", TRAINING, "cuda",
             "recompute activations in backward (Cross-Timestep, UniSegDiff): 'cuda' on a GPU only"),
    Variable("NNUNET_DIFFUSION_UNROLL_STEPS", "whole number > 0", TRAINING, "the trainer's (1; 2 for _unroll2)",
             "Cross-Timestep: steps with gradient per training chain"),
    Variable("NNUNET_DIFFUSION_CHAIN_STEPS", "whole number > 0", TRAINING, "the default sampler's steps (10)",
             "Cross-Timestep: length of the training chain (prediction must run it)"),
    Variable("NNUNET_DIFFUSION_CONDITION_CHECKPOINT", "file", TRAINING,
             "the stock nnUNetTrainer's checkpoint_final.pth of the same fold",
             "UniSegDiff: the stock nnU-Net checkpoint its CFENet starts from"),
    Variable("NNUNET_DIFFUSION_DSM_TUMOUR_LABELS", "comma-separated label names", TRAINING,
             "dataset.json's dsm_tumour_labels", "DSM stage 2: the labels it learns with its tumour queries"),
    Variable("NNUNET_DIFFUSION_TEXT_MODEL", "Hub id or folder", TRAINING, "the bundled all-MiniLM-L6-v2",
             "TextDiffSeg, DSM: the text encoder of the class prompts"),
]}


def read(name: str, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The stripped value of registered variable ``name``, or None when unset or empty."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not in nnunet_diffusion.settings.VARIABLES: register it there")
    raw = environ.get(name, "").strip()
    return raw or None


def set_variables(environ: Mapping[str, str] = os.environ) -> dict:
    """name -> value of every registered variable that is set (for logs and messages)."""
    return {name: environ[name].strip() for name in VARIABLES if read(name, environ) is not None}


def markdown_table() -> str:
    """The reference table of docs/reference/settings.md."""
    lines = ["| variable | value | applies at | unset means | what it does |", "|---|---|---|---|---|"]
    lines += [f"| `{v.name}` | {v.kind} | {v.applies} | {v.default} | {v.help} |" for v in VARIABLES.values()]
    return "\n".join(lines) + "\n"


def text_table() -> str:
    """What ``nnunet-diffusion settings`` prints: every variable, its current value if set."""
    width = max(len(name) for name in VARIABLES)
    lines = []
    for v in VARIABLES.values():
        value = read(v.name)
        lines.append(f"{v.name:<{width}}  [{v.applies}] {v.kind}; unset: {v.default}")
        lines.append(f"{'':<{width}}  {v.help}" + (f"\n{'':<{width}}  now set: {value}" if value else ""))
    return "\n".join(lines)


PAGE_HEADER = """# Settings: the NNUNET_DIFFUSION_* environment variables

Generated from `nnunet_diffusion/settings.py` (`python -m nnunet_diffusion.settings > docs/reference/settings.md`);
a test fails when this page and the registry differ. `nnunet-diffusion settings` prints the same list with the
values set in your shell.

Training-time variables shape what is trained and, where they change the model, are stored with it
(plans.json); prediction-time variables override the stored sampler at the final validation and in
`nnUNetv2_predict` / `nnunet-diffusion predict`, and are checked against what the model was trained for.

"""


def reference_page() -> str:
    """docs/reference/settings.md."""
    return PAGE_HEADER + markdown_table()


if __name__ == "__main__":
    print(reference_page(), end="")
