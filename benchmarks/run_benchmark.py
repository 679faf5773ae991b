"""Equal-time benchmark of our trainers against the stock nnUNetTrainer, through the stock nnU-Net CLI.

One run, one machine: build the real example dataset, plan and preprocess 3d_fullres, then for every trainer
train fold 0 for the same wall-clock budget (NNUNET_DIFFUSION_TIME_BUDGET), predict the held-out cases
(imagesTs, no mirroring) and evaluate them against labelsTs. Writes a markdown table with per-class and mean
Dice, seconds per training iteration, seconds per predicted case and peak memory (max RSS of the training and
prediction processes, or peak CUDA memory on a GPU), each also as a ratio to the stock trainer.

    python benchmarks/run_benchmark.py --budget 600 --out benchmarks/results_cpu.md

The stock trainer runs as nnUNetTrainerBudget: nnUNetTrainer unchanged but for the budget variables.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from nnunet_diffusion.cli import trainer_path
from nnunet_diffusion.planning.example_dataset import build_example_dataset

STOCK = "nnUNetTrainerBudget"
DEFAULT_TRAINERS = [STOCK, "nnUNetTrainerDiffusion", "nnUNetTrainerDiffSegRecycling"]


def run_measured(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run cmd; return (wall seconds, peak RSS in MiB of the process tree's largest process)."""
    wrapper = [sys.executable, "-c",
               "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)", *cmd]
    tic = time.perf_counter()
    result = subprocess.run(wrapper, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB")))
    return seconds, peak_kb / 1024


def benchmark_trainer(trainer: str, args, env: dict, raw: Path) -> dict:
    train_env = {**env, "NNUNET_DIFFUSION_TIME_BUDGET": str(args.budget), "NNUNET_DIFFUSION_EPOCHS": "1000",
                 "NNUNET_DIFFUSION_ITERATIONS": str(args.iterations_per_epoch),
                 "NNUNET_DIFFUSION_VAL_ITERATIONS": str(args.val_iterations), "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"}
    _, train_peak = run_measured(["nnUNetv2_train", str(args.dataset_id), "3d_fullres", "0", "-tr", trainer,
                                  "-device", args.device], train_env)
    model = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans__3d_fullres"
    timing = json.loads((model / "fold_0" / "training_time.json").read_text())
    out = Path(args.work) / "predictions" / trainer
    cases = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    predict_seconds, predict_peak = run_measured(
        ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(args.dataset_id), "-c",
         "3d_fullres", "-tr", trainer, "-f", "0", "-device", args.device, "-npp", "0", "-nps", "0",
         "--disable_tta"], env)
    run_measured(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(model / "dataset.json"),
                  "-pfile", str(model / "plans.json")], env)
    summary = json.loads((out / "summary.json").read_text())
    return {"trainer": trainer, "iterations": timing["iterations"], "s_per_it": timing["seconds_per_iteration"],
            "s_per_case": predict_seconds / len(cases), "train_peak_mib": train_peak,
            "predict_peak_mib": predict_peak, "dice": {k: v["Dice"] for k, v in summary["mean"].items()},
            "mean_dice": summary["foreground_mean"]["Dice"]}


def ratio(value: float, stock: float) -> str:
    return f"{value / stock:.2f}x" if stock else "n/a"


def write_table(rows: list[dict], labels: dict, args, command: str, elapsed: float) -> str:
    names = {str(v): k for k, v in labels.items() if v != 0}
    stock = next(r for r in rows if r["trainer"] == STOCK)
    lines = [f"# Benchmark: equal wall-clock training budget on the example data ({args.device})", "",
             f"Command: `{command}`", "",
             f"Budget: {args.budget} s of training per trainer (fold 0, 3d_fullres, {args.iterations_per_epoch} "
             f"iterations per epoch, {args.val_iterations} validation iterations per epoch, final validation "
             f"skipped), then prediction of the {args.num_test} held-out cases without mirroring and evaluation "
             f"against their labels. Dataset: {args.num_train} training cases at {args.spacing} mm. "
             f"Whole run: {elapsed / 60:.0f} min. Ratios are against the stock trainer in this run.", "",
             "| trainer | iterations | mean Dice | " + " | ".join(names[k] for k in sorted(names, key=int)) +
             " | s/iteration | s/predicted case | peak MiB train | peak MiB predict |",
             "|---" * (7 + len(names)) + "|"]
    for r in rows:
        dice = " | ".join(f"{r['dice'].get(k, float('nan')):.3f}" for k in sorted(names, key=int))
        lines.append(
            f"| {r['trainer']} | {r['iterations']} | {r['mean_dice']:.3f} ({ratio(r['mean_dice'], stock['mean_dice'])})"
            f" | {dice} | {r['s_per_it']:.2f} ({ratio(r['s_per_it'], stock['s_per_it'])})"
            f" | {r['s_per_case']:.1f} ({ratio(r['s_per_case'], stock['s_per_case'])})"
            f" | {r['train_peak_mib']:.0f} ({ratio(r['train_peak_mib'], stock['train_peak_mib'])})"
            f" | {r['predict_peak_mib']:.0f} ({ratio(r['predict_peak_mib'], stock['predict_peak_mib'])}) |")
    lines += ["", f"{STOCK} is the stock nnUNetTrainer with the NNUNET_DIFFUSION_* run-length variables. "
              "Diffusion trainers predict with their stored default sampler.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600, help="training seconds per trainer")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--work", default="work_dirs/benchmark", help="folder for nnU-Net data and results")
    parser.add_argument("--out", default="benchmarks/results_cpu.md")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset-id", type=int, default=502)
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--num-train", type=int, default=24)
    parser.add_argument("--num-test", type=int, default=6)
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    parser.add_argument("--val-iterations", type=int, default=5)
    args = parser.parse_args(argv)
    if STOCK not in args.trainers:
        parser.error(f"--trainers must include {STOCK}: every figure is a ratio to it")
    command = "python benchmarks/run_benchmark.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    work = Path(args.work).resolve()
    results = work / f"results_{time.strftime('%Y%m%d_%H%M%S')}"  # never train over an earlier run's results
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(results), "nnUNet_extTrainer": trainer_path(), "nnUNet_def_n_proc": "1",
           # the nnUNetv2_* commands of the Python running this script, even if its venv is not activated
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    existing = sorted(Path(env["nnUNet_raw"]).glob(f"Dataset{args.dataset_id:03d}_*"))
    raw = existing[0] if existing else Path(build_example_dataset(
        env["nnUNet_raw"], args.dataset_id, "BrainAtlasBench", args.num_train, args.num_test, args.spacing, seed=0))
    if not list(Path(env["nnUNet_preprocessed"]).glob(f"{raw.name}/nnUNetPlans.json")):
        run_measured(["nnUNetv2_plan_and_preprocess", "-d", str(args.dataset_id), "-c", "3d_fullres", "-np", "2",
                      "--verify_dataset_integrity"], {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"})
    env["nnUNet_n_proc_DA"] = "0"
    rows = []
    for trainer in args.trainers:
        print(f"[benchmark] {trainer}", flush=True)
        rows.append(benchmark_trainer(trainer, args, env, raw))
        print(json.dumps(rows[-1]), flush=True)
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    table = write_table(rows, labels, args, command, time.perf_counter() - started)
    Path(args.out).write_text(table)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
