"""``nnunet-diffusion predict``: nnUNetv2_predict's arguments (same names, same meaning) on ``DiffusionPredictor``,
plus --uncertainty, --max_batch and sampler overrides for diffusion trainers, and --prompts for DSM models.

Before the first case every input is checked (``input_checks``): a missing or empty folder stops the run with the
fix; a bad case (truncated file, no channel suffix, a 4D or 2D image that does not fit, ...) is refused with one
message naming the file, what is wrong and the fix, the good cases are predicted, and the exit code is 1 when any
case was refused (they have no output, so --continue_prediction picks them up once fixed)."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

import torch

from nnunet_diffusion.diffusion.samplers import FUSIONS, SAMPLER_KINDS
from nnunet_diffusion.inference.dsm_predictor import DSMPredictor
from nnunet_diffusion.inference.input_checks import CheckedInputs, InputFolderError, check_inputs
from nnunet_diffusion.inference.predictor import DEFAULT_MAX_BATCH, DiffusionPredictor

# our sampler flags set the variables every diffusion trainer's network reads when it is built (and validates)
SAMPLER_FLAGS = {"sampler": "NNUNET_DIFFUSION_SAMPLER", "steps": "NNUNET_DIFFUSION_STEPS",
                 "samples": "NNUNET_DIFFUSION_SAMPLES", "seed": "NNUNET_DIFFUSION_SEED", "fusion": "NNUNET_DIFFUSION_FUSION"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-diffusion predict",
        description="nnUNetv2_predict for diffusion trainers: every mirrored copy and sample of a window in one "
                    "sampler run, optional uncertainty maps, progress per sampler step, no half-written files. "
                    "Works for the stock trainer too.")
    add = parser.add_argument
    add("-i", required=True, help="input folder (file names as nnUNetv2_predict wants them: case_0000.nii.gz, ...)")
    add("-o", required=True, help="output folder (created if missing)")
    add("-d", required=True, help="dataset name or id")
    add("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    add("-tr", default="nnUNetTrainer", help="trainer class used for training (default nnUNetTrainer)")
    add("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    add("-f", nargs="+", default=(0, 1, 2, 3, 4), help="folds to ensemble (default 0 1 2 3 4), or 'all'")
    add("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch (default 0.5)")
    add("--disable_tta", action="store_true", help="no test-time mirroring")
    add("--verbose", action="store_true")
    add("--save_probabilities", action="store_true", help="also write <case>.npz class probabilities")
    add("--continue_prediction", action="store_true", help="predict only the cases whose files are not all there")
    add("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    add("-npp", type=int, default=int(os.environ.get("nnUNet_npp", 3)), help="preprocessing processes (0: none)")
    add("-nps", type=int, default=int(os.environ.get("nnUNet_nps", 3)), help="export processes (0: none)")
    add("-prev_stage_predictions", default=None, help="previous stage's predictions (cascade)")
    add("-num_parts", type=int, default=1, help="split the cases into this many separate calls")
    add("-part_id", type=int, default=0, help="which part this call predicts (0 .. num_parts-1)")
    add("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device (default cuda)")
    add("--disable_progress_bar", action="store_true", help="no progress bars (windows, sampler steps)")
    add("--not_on_device", action="store_true", help="keep the case's result arrays in CPU memory")
    ours = parser.add_argument_group("nnunet-diffusion")
    ours.add_argument("--uncertainty", action="store_true",
                      help="also write uncertainty/<case>_uncertainty (predictive entropy, nats) and "
                           "uncertainty/<case>_mutual_information (disagreement between mirrored copies and "
                           "samples) in the output folder, in the input's geometry")
    ours.add_argument("--max_batch", type=int, default=DEFAULT_MAX_BATCH,
                      help=f"most members (windows x mirrored copies x samples; UniSegDiff's staged sampler counts its "
                           f"2 chains, not its samples) per network call; lower it if memory runs out (default "
                           f"{DEFAULT_MAX_BATCH})")
    ours.add_argument("--sampler", choices=list(SAMPLER_KINDS), help="override the stored sampler kind ('staged': "
                      "UniSegDiff's staged models only)")
    ours.add_argument("--fusion", choices=list(FUSIONS), help="how a window's samples become probabilities: mean of "
                      "their probabilities, or STAPLE on their label maps")
    ours.add_argument("--steps", type=int, help="override the stored number of reverse steps")
    ours.add_argument("--samples", type=int, help="samples per window (their spread feeds --uncertainty)")
    ours.add_argument("--seed", type=int, help="seed of the start noise (same seed, same segmentation)")
    ours.add_argument("--deterministic", action="store_true",
                      help="CUDA: deterministic kernels (cuDNN autotuning off, torch.use_deterministic_algorithms), "
                           "so that repeated runs on the same GPU give the same result; slower. The CPU always is")
    ours.add_argument("--prompts", nargs="+", metavar="CLASS",
                      help="DSM models: name classes not seen in training; also write dsm/<case>_anomaly (anomaly "
                           "score) and dsm/<case>_<class> (its map) in the output folder, in the input's geometry")
    return parser


def set_deterministic() -> None:
    """Deterministic CUDA kernels: without them cuDNN's autotuning and atomic adds make repeated runs differ in the
    last bits, which can flip the label of a voxel near 0.5 (CPU kernels are deterministic anyway)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first call
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_predictor(args: argparse.Namespace) -> DiffusionPredictor:
    """The predictor the parsed arguments ask for, initialised from the trained model folder."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if not 0 <= args.part_id < args.num_parts:
        raise SystemExit(f"-part_id must be in 0..{args.num_parts - 1} (-num_parts {args.num_parts}), "
                         f"got {args.part_id}")
    folds = [f if f == "all" else int(f) for f in args.f]
    overrides = {name: getattr(args, name) for name in SAMPLER_FLAGS if getattr(args, name) is not None}
    for name, value in overrides.items():  # read, and checked against the trained model, when the network is built
        os.environ[SAMPLER_FLAGS[name]] = str(value)
    if args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    if args.deterministic:
        set_deterministic()
    if args.prompts and args.uncertainty:
        raise SystemExit("--prompts and --uncertainty: choose one (a DSM model has no samples to measure a spread of)")
    predictor_class, extra = ((DSMPredictor, {"prompts": args.prompts}) if args.prompts else
                              (DiffusionPredictor, {"uncertainty": args.uncertainty}))
    predictor = predictor_class(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                                perform_everything_on_device=not args.not_on_device, device=torch.device(args.device),
                                verbose=args.verbose, verbose_preprocessing=args.verbose,
                                allow_tqdm=not args.disable_progress_bar, max_batch=args.max_batch, **extra)
    predictor.initialize_from_trained_model_folder(get_output_folder(args.d, args.tr, args.p, args.c), folds,
                                                   checkpoint_name=args.chk)
    if args.deterministic:
        set_deterministic()  # again: nnU-Net's predictor turned cuDNN autotuning on
    if overrides and predictor.segmenter is None:
        raise SystemExit(f"--{' --'.join(overrides)}: {args.tr} is not a diffusion trainer and has no sampler.")
    return predictor


def model_files(args: argparse.Namespace):
    """(dataset.json, plans.json) of the model folder the arguments name, or None where they cannot be read (the
    predictor then says why when it loads the model)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    try:
        folder = get_output_folder(args.d, args.tr, args.p, args.c)
        with open(os.path.join(folder, "dataset.json")) as f:
            dataset_json = json.load(f)
        with open(os.path.join(folder, "plans.json")) as f:
            plans = json.load(f)
        if args.c not in plans.get("configurations", {}) or "file_ending" not in dataset_json:
            return None
    except Exception:  # no such dataset, model folder or file: the predictor's own message says which
        return None
    return dataset_json, plans


def check_prediction_inputs(args: argparse.Namespace, dataset_json: dict, plans: dict) -> CheckedInputs:
    """Every case of -i (this part's, with -num_parts) read and checked; SystemExit with the fix if none can be."""
    try:
        return check_inputs(args.i, dataset_json, plans, args.c, args.o, args.continue_prediction, args.part_id,
                            args.num_parts, args.prev_stage_predictions,
                            save_probabilities=args.save_probabilities)
    except InputFolderError as error:
        raise SystemExit(str(error)) from None


def report_refused(checked: CheckedInputs, at_end: bool = False) -> None:
    """The refused cases, one message each (file, what is wrong, the fix), on stderr."""
    if not checked.refused:
        return
    total = len(checked.good) + len(checked.refused) + len(checked.unchecked)
    if at_end:
        head = (f"{len(checked.refused)} of {total} cases in {checked.folder} were refused; no segmentation was "
                f"written for them:")
    else:
        head = (f"{len(checked.refused)} of {total} cases in {checked.folder} cannot be predicted"
                f"{f' (the other {total - len(checked.refused)} will be)' if total > len(checked.refused) else ''}:")
    lines = [head, *(f"  {case.message}" for case in checked.refused)]
    if at_end:
        lines.append("Fix them and run the same command with --continue_prediction: it predicts only the cases "
                     "without a segmentation in the output folder.")
        if checked.stale:
            lines.append(f"Left as they were: the segmentations of {', '.join(c.name for c in checked.stale)} in "
                         f"{checked.output_folder} are from an earlier run (delete them, or --continue_prediction "
                         f"takes those cases as done).")
    print("\n".join(lines), file=sys.stderr, flush=True)


def predict_cases(args: argparse.Namespace, predictor: DiffusionPredictor, checked: CheckedInputs = None) -> None:
    """Predict the cases of -i (``checked``: only its cases to predict, as lists of files)."""
    os.makedirs(args.o, exist_ok=True)
    source, outputs, num_parts, part_id = args.i, args.o, args.num_parts, args.part_id
    if checked is not None:  # already this part's cases
        cases = checked.to_predict
        if not cases:
            return
        source, outputs = [case.files for case in cases], [os.path.join(args.o, case.name) for case in cases]
        num_parts, part_id = 1, 0
    predictor.predict_from_files(source, outputs, save_probabilities=args.save_probabilities,
                                 overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                 num_processes_segmentation_export=args.nps,
                                 folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                 num_parts=num_parts, part_id=part_id)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.part_id < args.num_parts:
        raise SystemExit(f"-part_id must be in 0..{args.num_parts - 1} (-num_parts {args.num_parts}), "
                         f"got {args.part_id}")
    model = model_files(args)
    checked = check_prediction_inputs(args, *model) if model is not None else None  # before the model loads
    if checked is not None:
        if not checked.to_predict:
            if not checked.refused:
                print(f"Part {args.part_id} of {args.num_parts} holds no case of {args.i}: nothing to predict.")
                return 0
            report_refused(checked, at_end=True)
            return 1
        report_refused(checked)
    predictor = make_predictor(args)
    if checked is None:
        checked = check_prediction_inputs(args, predictor.dataset_json, predictor.plans_manager.plans)
        report_refused(checked)
    predict_cases(args, predictor, checked)
    if checked.refused:
        report_refused(checked, at_end=True)
        return 1
    return 0
