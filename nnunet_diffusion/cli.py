"""`nnunet-diffusion` command: set-up helpers and our own tools beside the stock nnUNetv2_* commands."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

TRAINER_PATH = Path(__file__).resolve().parent / "nnunet_ext"
ENV_LINE = 'export nnUNet_extTrainer="$(nnunet-diffusion trainer-path)"'
# subcommands that are a module's main(argv) (their own --help)
TOOLS = {"collapse-analysis": "nnunet_diffusion.analysis.collapse",
         "build-example": "nnunet_diffusion.planning.example_dataset",
         "slices-figure": "nnunet_diffusion.analysis.slices_figure", "predict": "nnunet_diffusion.inference.command",
         "small-plans": "nnunet_diffusion.planning.small_plans"}


def trainer_path() -> str:
    """The folder to put in env var nnUNet_extTrainer so that nnU-Net finds our trainers."""
    return str(TRAINER_PATH)


def setup_problems(environ=os.environ) -> list[str]:
    """What is missing for the stock nnU-Net commands to use our trainers, each with its fix."""
    problems = []
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not environ.get(name):
            problems.append(f"{name} is not set: export {name}=/path/to/{name} (see nnU-Net's set-up docs).")
    ext = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    if not any(Path(p).resolve() == TRAINER_PATH for p in ext if Path(p).exists()):
        problems.append(f"nnUNet_extTrainer does not contain {TRAINER_PATH}, so nnUNetv2_train/nnUNetv2_predict "
                        f"cannot find the diffusion trainers. Fix: {ENV_LINE}")
    return problems


def format_dice(summary_json: str, dataset_json: str) -> str:
    """Per-class and mean foreground Dice from nnU-Net's evaluation summary, with class names."""
    summary = json.loads(Path(summary_json).read_text())
    names = {str(v): k for k, v in json.loads(Path(dataset_json).read_text())["labels"].items()}
    lines = [f"{names.get(k, k):>28s}  Dice {v['Dice']:.3f}" for k, v in sorted(summary["mean"].items(),
                                                                                  key=lambda kv: int(kv[0]))]
    lines.append(f"{'mean (foreground)':>28s}  Dice {summary['foreground_mean']['Dice']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("trainer-path", help="print the folder for env var nnUNet_extTrainer")
    sub.add_parser("check", help="check the environment variables nnU-Net needs; exit 1 with the fix if not")
    sub.add_parser("settings", help="list every NNUNET_DIFFUSION_* variable: type, when it applies, default, value")
    dice = sub.add_parser("dice", help="print per-class Dice from nnUNetv2_evaluate_folder's summary.json")
    dice.add_argument("summary")
    dice.add_argument("dataset_json")
    sub.add_parser("collapse-analysis", help="Dice vs start timestep and along a reverse run (see --help)",
                   add_help=False)
    sub.add_parser("build-example", help="build a real-MRI example dataset: --atlas aal (default) or "
                                         "harvard_oxford (see build-example --help)",
                   add_help=False)
    sub.add_parser("slices-figure", help="PNG of image, ground truth and prediction slices (see --help)",
                   add_help=False)
    sub.add_parser("predict", help="nnUNetv2_predict with batched mirroring, uncertainty maps (see predict --help)",
                   add_help=False)
    sub.add_parser("small-plans", help="write a narrower copy of a dataset's plans, for CPUs (see --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "trainer-path":
        print(trainer_path())
        return 0
    if args.command == "check":
        problems = setup_problems()
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print("nnunet-diffusion set-up OK: nnU-Net will find the diffusion trainers.")
        return 1 if problems else 0
    if args.command == "settings":
        from nnunet_diffusion.settings import text_table
        print(text_table())
        return 0
    if args.command == "dice":
        print(format_dice(args.summary, args.dataset_json))
        return 0
    if args.command in TOOLS:  # imported here: each tool's imports (torch, nnU-Net) cost seconds
        result = importlib.import_module(TOOLS[args.command]).main(rest)
        return result if isinstance(result, int) else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
