"""Do the uncertainty maps of ``nnunet-diffusion predict --uncertainty`` point at the errors? Per trainer and number
of samples, beside the stock nnU-Net trainer(s), on the held-out cases of a dataset.

For every trainer and every ``--samples`` value this runs

    nnunet-diffusion predict -i <cases> -o <work>/<model>/samples_<n> -d ... -tr <trainer> -p ... -c ... -f <fold>
        -device ... -npp 0 -nps 0 --disable_progress_bar --uncertainty --save_probabilities [--samples n]

WITH test-time mirroring (the model's stored mirror axes), so the members whose spread the maps measure are the
mirrored copies x the samples. The stock trainers (names starting with nnUNetTrainerBudget) have no sampler:
``--samples`` means nothing for them, so they run once (one sample, members = the mirrored copies), and are the
reference rows. Then, per run, pooling the voxels of all cases:

- error detection: AUROC of the predictive-entropy map (``<case>_uncertainty``) and of the mutual-information map
  (``<case>_mutual_information``) as detectors of the wrong voxels (segmentation != reference), over the voxels
  where the segmentation or the reference is foreground (``calibration.error_detection``; 0.5 = chance);
- calibration: the reliability curve and ECE of the max class probability of ``<case>.npz`` against whether the
  segmentation is right, over all voxels (``--bins`` equal-width bins);
- mean Dice: per foreground class and case from the written segmentations (a class absent from both is skipped,
  as nnU-Net does), then the mean;
- s/case: the command's time from its first 'Predicting' line to its end, over the cases (start-up and model
  loading are left out; they are in the .json as startup_s).

Writes ``--out`` (markdown table, with the command that made it), a .json beside it with the same rows plus the
reliability curves and the exact predict commands, and a .png reliability diagram.

Example (the CPU models of the example dataset, all held-out cases):

    python benchmarks/uncertainty_benchmark.py --results /work/bench/results_20261201_141427 \\
        --raw /work/bench/raw --dataset Dataset503_BrainAtlasBench --plans nnUNetPlans_CPU --configuration 2d \\
        --trainers nnUNetTrainerBudget nnUNetTrainerBudgetAdam1en3 nnUNetTrainerCrossTimestep \\
                   nnUNetTrainerTextDiffSeg nnUNetTrainerUniSegDiff \\
        --samples 1 4 --out benchmarks/uncertainty_cpu.md

Set NNUNET_DIFFUSION_MIRROR_AXES as for training (1 for these models); nnUNet_raw/nnUNet_preprocessed are taken
from the environment where --raw/--preprocessed are not given, nnUNet_extTrainer is set here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_diffusion.analysis.calibration import (calibration_error_of_curve, error_detection, error_region,
                                                   reliability_curve)
from nnunet_diffusion.cli import trainer_path

STOCK_PREFIX = "nnUNetTrainerBudget"
DEFAULT_TRAINERS = ["nnUNetTrainerBudget", "nnUNetTrainerBudgetAdam1en3", "nnUNetTrainerCrossTimestep",
                    "nnUNetTrainerTextDiffSeg", "nnUNetTrainerUniSegDiff"]


def is_stock(trainer: str) -> bool:
    """Stock nnU-Net trainers (no sampler): their members are the mirrored copies, --samples does not apply."""
    return trainer.startswith(STOCK_PREFIX)


def parse_trainer_samples(specs: list[str]) -> dict:
    """['T=4,20', 'U=none'] -> {'T': [4, 20], 'U': [None]} (None: no --samples, the trainer has no sampler)."""
    out = {}
    for spec in specs:
        trainer, _, values = spec.partition("=")
        if not trainer or not values:
            raise SystemExit(f"--trainer-samples {spec!r}: write TRAINER=N,M or TRAINER=none")
        out[trainer] = [None] if values == "none" else [int(v) for v in values.split(",")]
    return out


# ---- inputs --------------------------------------------------------------------------------------------------

def dataset_folder(raw: Path, dataset: str) -> Path:
    """nnUNet_raw/<DatasetXXX_Name> for a dataset name or id."""
    if (raw / dataset).is_dir():
        return raw / dataset
    if dataset.isdigit():
        found = sorted(raw.glob(f"Dataset{int(dataset):03d}_*"))
        if found:
            return found[0]
    raise SystemExit(f"no dataset {dataset!r} in {raw}")


def select_cases(images: Path, labels: Path, file_ending: str, n_cases: int | None) -> list[str]:
    """The first ``n_cases`` (all: None) case names of ``images`` (sorted) that have a reference in ``labels``."""
    cases = sorted({p.name[:-len(file_ending)][:-5] for p in images.glob(f"*_0000{file_ending}")})
    missing = [c for c in cases if not (labels / f"{c}{file_ending}").is_file()]
    if missing:
        raise SystemExit(f"no reference in {labels} for {', '.join(missing)}")
    if not cases:
        raise SystemExit(f"no cases (*_0000{file_ending}) in {images}")
    return cases[:n_cases] if n_cases else cases


def link_inputs(images: Path, cases: list[str], folder: Path) -> Path:
    """A folder with links to every channel file of ``cases`` only (what -i reads)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for case in cases:
        for file in sorted(images.glob(f"{case}_[0-9][0-9][0-9][0-9]*")):
            (folder / file.name).symlink_to(file.resolve())
    return folder


# ---- prediction ------------------------------------------------------------------------------------------------

def predict_command(args, trainer: str, samples: int | None, inputs: Path, out: Path) -> list[str]:
    """The nnunet-diffusion predict command line of one run (mirroring on: no --disable_tta)."""
    executable = Path(sys.executable).with_name("nnunet-diffusion")
    command = [str(executable) if executable.is_file() else "nnunet-diffusion", "predict",
               "-i", str(inputs), "-o", str(out), "-d", args.dataset, "-p", args.plans, "-tr", trainer,
               "-c", args.configuration, "-f", *args.folds,
               "-device", args.device, "-npp", "0", "-nps", "0", "--disable_progress_bar", "--uncertainty",
               "--save_probabilities"]
    if samples is not None:
        command += ["--samples", str(samples)]
        if args.seed is not None:
            command += ["--seed", str(args.seed)]
    return command


def run_predict(command: list[str], env: dict, out: Path, n_cases: int) -> dict:
    """Run one predict command (its output logged to <out>_predict.log, beside the output folder); time it from its
    first 'Predicting' line (start-up and model loading before it) to its end."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}_predict.log"  # beside the output folder: predict refuses nothing there
    started, first = time.perf_counter(), None
    with open(log, "w") as handle:
        handle.write(shlex.join(command) + "\n")
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            if first is None and line.startswith("Predicting "):
                first = time.perf_counter()
            handle.write(line)
        rc = process.wait()
    ended = time.perf_counter()
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"exit code {rc} ({log}):\n{tail}")
    first = ended if first is None else first
    timing = {"wall_s": ended - started, "startup_s": first - started, "s_per_case": (ended - first) / n_cases}
    (out.parent / f"{out.name}_timing.json").write_text(json.dumps(timing))
    return timing


# ---- analysis --------------------------------------------------------------------------------------------------

def read_array(path: Path) -> np.ndarray:
    import SimpleITK as sitk
    if not path.is_file():
        raise FileNotFoundError(f"{path} was not written")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_per_class(predicted: np.ndarray, reference: np.ndarray, classes: list[int]) -> dict:
    """{class: Dice} of two label maps; NaN where the class is in neither (nnU-Net leaves those out of its mean)."""
    scores = {}
    for c in classes:
        p, r = predicted == c, reference == c
        total = int(p.sum()) + int(r.sum())
        scores[c] = 2.0 * int((p & r).sum()) / total if total else math.nan
    return scores


def safe(function, *arguments, **keywords) -> float:
    """The metric, or NaN where it is undefined (e.g. no wrong voxel at all)."""
    try:
        return function(*arguments, **keywords)
    except ValueError:
        return math.nan


def analyse(out: Path, labels: Path, cases: list[str], file_ending: str, class_names: dict, bins: int) -> dict:
    """Metrics of one run over all its cases (voxels pooled; Dice per case and class, then the mean)."""
    entropy, mutual, predicted, reference, confidence = [], [], [], [], []
    dice = {c: [] for c in class_names}
    for case in cases:
        segmentation = read_array(out / f"{case}{file_ending}")
        truth = read_array(labels / f"{case}{file_ending}")
        probabilities = np.load(out / f"{case}.npz")["probabilities"]  # (C, *S): the input's array axes
        maps = [read_array(out / "uncertainty" / f"{case}_{name}{file_ending}")
                for name in ("uncertainty", "mutual_information")]
        shapes = {a.shape for a in (segmentation, truth, probabilities[0], *maps)}
        if len(shapes) != 1:
            raise ValueError(f"{case}: segmentation {segmentation.shape}, reference {truth.shape}, probabilities "
                             f"{probabilities.shape}, maps {[m.shape for m in maps]} do not line up")
        for c, value in dice_per_class(segmentation, truth, list(class_names)).items():
            dice[c].append(value)
        entropy.append(maps[0].ravel())
        mutual.append(maps[1].ravel())
        predicted.append(segmentation.ravel())
        reference.append(truth.ravel())
        confidence.append(probabilities.max(axis=0).ravel())
    entropy, mutual, predicted, reference = map(np.concatenate, (entropy, mutual, predicted, reference))
    confidence = np.clip(np.concatenate(confidence).astype(np.float64), 0.0, 1.0)  # float32 sums to 1 +- 1e-7
    correct = predicted == reference
    curve = reliability_curve(confidence, correct, bins)
    foreground = error_region(predicted, reference, "foreground")
    per_class = {class_names[c]: float(np.nanmean(v)) if not np.isnan(v).all() else math.nan
                 for c, v in dice.items()}
    all_dice = np.array([v for values in dice.values() for v in values], dtype=np.float64)
    return {
        "mean_dice": float(np.nanmean(all_dice)) if not np.isnan(all_dice).all() else math.nan,
        "dice_per_class": per_class,
        "auroc_entropy": safe(error_detection, entropy, predicted, reference, "foreground"),
        "auroc_mi": safe(error_detection, mutual, predicted, reference, "foreground"),
        "auroc_entropy_all": safe(error_detection, entropy, predicted, reference, "all"),
        "auroc_mi_all": safe(error_detection, mutual, predicted, reference, "all"),
        "ece": calibration_error_of_curve(curve),
        "ece_foreground": safe(lambda: calibration_error_of_curve(
            reliability_curve(confidence[foreground], correct[foreground], bins))),
        "error_rate_foreground": float((~correct[foreground]).mean()) if foreground.any() else math.nan,
        "voxels": int(correct.size), "foreground_voxels": int(foreground.sum()),
        "reliability": {"bin_edges": np.linspace(0, 1, bins + 1).tolist(),
                        "mean_confidence": curve.mean_confidence.tolist(), "accuracy": curve.accuracy.tolist(),
                        "count": curve.count.tolist()},
    }


# ---- report ----------------------------------------------------------------------------------------------------

def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def samples_label(row: dict) -> str:
    return "1 (stock: no sampler, `--samples` n/a; members = mirrored copies)" if row["stock"] else str(row["samples"])


def verdict(rows: list[dict]) -> str:
    """One line: per diffusion trainer, is its entropy AUROC above the best stock row's, and did more samples raise
    it (the fewest against the most samples run)."""
    usable = [r for r in rows if not math.isnan(r["auroc_entropy"])]
    stock = [r for r in usable if r["stock"]]
    if not stock:
        return "No stock trainer row with an entropy AUROC: nothing to compare against."
    best = max(stock, key=lambda r: r["auroc_entropy"])
    parts = []
    for trainer in dict.fromkeys(r["trainer"] for r in rows if not r["stock"]):
        mine = sorted((r for r in usable if r["trainer"] == trainer), key=lambda r: r["samples"])
        if not mine:
            parts.append(f"{trainer}: no entropy AUROC")
            continue
        above = [f"{r['samples']}: {'above' if r['auroc_entropy'] > best['auroc_entropy'] else 'not above'} "
                 f"({fmt(r['auroc_entropy'])})" for r in mine]
        text = f"{trainer} entropy AUROC vs best stock at samples " + ", ".join(above)
        if len(mine) > 1:
            low, high = mine[0], mine[-1]
            change = high["auroc_entropy"] - low["auroc_entropy"]
            word = "raised" if change > 0 else ("lowered" if change < 0 else "left unchanged")
            text += (f"; more samples {word} it ({low['samples']} -> {high['samples']}: "
                     f"{fmt(low['auroc_entropy'])} -> {fmt(high['auroc_entropy'])})")
        else:
            text += "; more samples: not measured"
        parts.append(text)
    return (f"Against the best stock row ({best['trainer']}, entropy AUROC {fmt(best['auroc_entropy'])}): "
            + "; ".join(parts) + ".")


def write_markdown(rows: list[dict], failed: dict, command: str, args, cases: list[str], elapsed: float) -> str:
    lines = ["# Uncertainty that points at errors: error-detection AUROC and calibration per trainer", "",
             f"Command: `{command}`", "",
             f"{len(cases)} held-out case(s) of {args.dataset} ({', '.join(cases)}), {args.configuration}, plans "
             f"{args.plans}, fold(s) {' '.join(args.folds)}, device {args.device}, `nnunet-diffusion predict "
             f"--uncertainty --save_probabilities` with test-time mirroring (the model's stored axes), -npp 0 -nps 0; "
             f"whole run {elapsed / 60:.1f} min. Voxels of all cases pooled. AUROC: the map as a detector of wrong "
             f"voxels (segmentation != reference) over the voxels where either is foreground (0.5 = chance). ECE: "
             f"max class probability of the .npz against correctness, all voxels, {args.bins} equal-width bins. "
             f"Mean Dice: per case and foreground class, then the mean. s/case: prediction time per case without "
             f"start-up and model loading. Stock rows (nnUNetTrainerBudget*) are the reference.", "",
             "| trainer | samples | mean Dice | AUROC entropy | AUROC MI | ECE | s/case |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {samples_label(r)} | {fmt(r['mean_dice'])} | {fmt(r['auroc_entropy'])} | "
                     f"{fmt(r['auroc_mi'])} | {fmt(r['ece'], 4)} | {fmt(r['s_per_case'], 2)} |")
    lines += ["", verdict(rows)]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {k}: `{v}`" for k, v in failed.items()]
    diagram = f"Reliability diagram: {Path(args.out).with_suffix('.png').name}; " if rows else ""
    lines += ["", f"{diagram}rows, reliability curves, per-class Dice, AUROCs over all voxels and the exact predict "
                  f"commands: {Path(args.out).with_suffix('.json').name}.", ""]
    return "\n".join(lines)


def plot_reliability(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    left.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for r in rows:
        curve = r["reliability"]
        count = np.asarray(curve["count"])
        keep = count > 0
        confidence = np.asarray(curve["mean_confidence"], dtype=float)[keep]
        accuracy = np.asarray(curve["accuracy"], dtype=float)[keep]
        label = f"{r['trainer'].removeprefix('nnUNetTrainer')} s={r['samples']} (ECE {fmt(r['ece'], 4)})"
        style = "--" if r["stock"] else "-"
        left.plot(confidence, accuracy, style, marker="o", markersize=3, label=label)
        centres = np.asarray(curve["bin_edges"][:-1]) + 0.5 / len(count)
        right.plot(centres[keep], count[keep], style, marker="o", markersize=3, label=label)
    left.set(xlabel="mean max-class probability in bin", ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1),
             title="Reliability (all voxels, pooled cases)")
    right.set(xlabel="confidence bin centre", ylabel="voxels", yscale="log", xlim=(0, 1), title="Voxels per bin")
    left.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def jsonable(value):
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


# ---- main ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--results", required=True, help="nnUNet_results folder holding the trained models")
    add("--dataset", default="Dataset503_BrainAtlasBench", help="dataset name or id (as predict's -d)")
    add("--plans", default="nnUNetPlans_CPU")
    add("--configuration", default="2d")
    add("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    add("--samples", nargs="+", type=int, default=[1, 4], help="samples per window for the diffusion trainers "
        "(stock trainers run once)")
    add("--trainer-samples", nargs="+", default=[], metavar="TRAINER=N,M|none",
        help="per trainer, other samples than --samples: e.g. nnUNetTrainerUniSegDiff=4,20 (its staged sampler takes "
             "an even number; the paper's is 20) or nnUNetTrainerDSMStage2=none (no sampler: run once, as the "
             "stock trainers)")
    add("--cases", type=int, default=None, help="only the first N held-out cases (default: all)")
    add("--out", default="benchmarks/uncertainty_cpu.md", help="markdown table; .json and .png beside it")
    add("--work", default="/tmp/uncertainty_work", help="folder for the inputs and predictions")
    add("--raw", default=os.environ.get("nnUNet_raw"), help="nnUNet_raw (default: $nnUNet_raw)")
    add("--preprocessed", default=os.environ.get("nnUNet_preprocessed"),
        help="nnUNet_preprocessed (default: $nnUNet_preprocessed)")
    add("--images", default=None, help="input images (default: <raw>/<dataset>/imagesTs)")
    add("--labels", default=None, help="references (default: <raw>/<dataset>/labelsTs)")
    add("--folds", nargs="+", default=["0"], help="folds (predict's -f; default 0)")
    add("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    add("--seed", type=int, default=None, help="diffusion trainers: --seed for predict (default: the model's)")
    add("--bins", type=int, default=10, help="reliability bins on [0, 1] (default 10)")
    add("--reuse", action="store_true", help="analyse predictions already in --work (from an earlier run with the "
        "same settings) instead of predicting again")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = "python benchmarks/uncertainty_benchmark.py " + shlex.join(argv)
    if not args.raw and not (args.images and args.labels):
        raise SystemExit("give --raw (or set nnUNet_raw), or --images and --labels")
    raw_dataset = dataset_folder(Path(args.raw), args.dataset) if args.raw else None
    dataset_json = json.loads(((raw_dataset / "dataset.json") if raw_dataset else
                               Path(args.labels).parent / "dataset.json").read_text())
    file_ending = dataset_json["file_ending"]
    if any(not isinstance(v, int) for v in dataset_json["labels"].values()):
        raise SystemExit("region-based labels are not supported (the Dice and errors here compare label values)")
    class_names = {v: k for k, v in dataset_json["labels"].items() if v != 0}
    images = Path(args.images) if args.images else raw_dataset / "imagesTs"
    labels = Path(args.labels) if args.labels else raw_dataset / "labelsTs"
    cases = select_cases(images, labels, file_ending, args.cases)
    work = Path(args.work).resolve()
    inputs = work / "input"
    if not (args.reuse and inputs.is_dir()):
        link_inputs(images, cases, inputs)
    env = {**os.environ, "nnUNet_results": str(Path(args.results).resolve()), "nnUNet_extTrainer": trainer_path(),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.update({k: v for k, v in (("nnUNet_raw", args.raw), ("nnUNet_preprocessed", args.preprocessed)) if v})
    env.setdefault("nnUNet_def_n_proc", "1")
    rows, failed = [], {}
    started = time.perf_counter()
    per_trainer = parse_trainer_samples(args.trainer_samples)
    for trainer in args.trainers:
        runs = [None] if is_stock(trainer) else per_trainer.get(trainer, list(dict.fromkeys(args.samples)))
        for samples in runs:
            name = f"{trainer} samples {samples or 1}"
            out = work / f"{trainer}__{args.plans}__{args.configuration}" / f"samples_{samples or 1}"
            predict = predict_command(args, trainer, samples, inputs, out)
            print(f"[uncertainty benchmark] {name}: {shlex.join(predict)}", flush=True)
            try:
                timing_file = out.parent / f"{out.name}_timing.json"
                if args.reuse and timing_file.is_file():
                    timing = json.loads(timing_file.read_text())
                else:
                    timing = run_predict(predict, env, out, len(cases))
                metrics = analyse(out, labels, cases, file_ending, class_names, args.bins)
            except (RuntimeError, FileNotFoundError, ValueError) as error:
                failed[name] = str(error).strip().splitlines()[-1][:300]
                print(f"[uncertainty benchmark] {name} FAILED: {error}", flush=True)
                continue
            row = {"trainer": trainer, "samples": samples or 1, "stock": is_stock(trainer), "cases": len(cases),
                   **{k: v for k, v in metrics.items()}, **timing, "predict_command": shlex.join(predict)}
            rows.append(row)
            print(json.dumps(jsonable({k: v for k, v in row.items() if k != "reliability"})), flush=True)
    table = write_markdown(rows, failed, command, args, cases, time.perf_counter() - started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps(jsonable(
        {"command": command, "cases": cases, "rows": rows, "failed": failed, "verdict": verdict(rows)}), indent=1))
    if rows:
        plot_reliability(rows, out.with_suffix(".png"))
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
