"""Equal-time benchmark of our trainers against the stock nnUNetTrainer, through the stock nnU-Net CLI.

One run, one machine: build the real example dataset, plan and preprocess a configuration (default 2d, the
main job's), derive the narrower CPU
plans (``nnunet-diffusion small-plans``, the main job's), then for every trainer train fold 0 for the same
wall-clock budget (NNUNET_DIFFUSION_TIME_BUDGET, learning rate annealed over it), predict the held-out cases
(imagesTs, no mirroring) and evaluate them against labelsTs. Writes a markdown table with per-class and mean
Dice, seconds per training iteration, seconds per predicted case and peak memory (max RSS of the training and
prediction processes), each also as a ratio to the stock trainer, and a PNG of every trainer's per-epoch
pseudo-Dice against wall-clock training time (from the checkpoint's log).

    python benchmarks/run_benchmark.py --budget 420 --out benchmarks/results_cpu.md

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
from nnunet_diffusion.planning.example_dataset import DEFAULT_RECIPE, RECIPES, build_example_dataset
from nnunet_diffusion.planning.small_plans import write_small_plans

STOCK = "nnUNetTrainerBudget"
# the stock network with AdamW (nnU-Net's nnUNetTrainerAdam1en3): our trainers use AdamW, so a lead over STOCK (SGD)
# alone may be the optimiser's; every run has both rows
STOCK_ADAMW = "nnUNetTrainerBudgetAdam1en3"
# nnU-Net's planners (-pl) and the plans identifier each writes
PLANNER_PLANS = {"ExperimentPlanner": "nnUNetPlans", "nnUNetPlannerResEncM": "nnUNetResEncUNetMPlans",
                 "nnUNetPlannerResEncL": "nnUNetResEncUNetLPlans", "nnUNetPlannerResEncXL": "nnUNetResEncUNetXLPlans"}
DEFAULT_TRAINERS = [STOCK, STOCK_ADAMW, "nnUNetTrainerCrossTimestep", "nnUNetTrainerUniSegDiff",
                    "nnUNetTrainerTextDiffSeg", "nnUNetTrainerDSM", "nnUNetTrainerDSMStage2", "nnUNetTrainerDiffSegRecycling"]


def run_measured(cmd: list[str], env: dict, return_stdout: bool = False):
    """Run cmd; return (wall seconds, peak RSS in MiB of the process tree's largest process[, stdout])."""
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
    return (seconds, peak_kb / 1024, result.stdout) if return_stdout else (seconds, peak_kb / 1024)


def pseudo_dice_curve(checkpoint: Path) -> dict:
    """Per-epoch (training seconds, pseudo-Dice, its moving average) from a checkpoint's nnU-Net log."""
    import torch
    log = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    seconds = log.get("budget_elapsed_s") or [e - log["epoch_start_timestamps"][0] for e in log["epoch_end_timestamps"]]
    n = min(len(seconds), len(log["mean_fg_dice"]))
    return {"seconds": [float(x) for x in seconds[:n]], "pseudo_dice": [float(x) for x in log["mean_fg_dice"][:n]],
            "ema_pseudo_dice": [float(x) for x in log["ema_fg_dice"][:n]]}


def plot_curves(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        curve = r["curve"]
        line, = ax.plot(curve["seconds"], curve["ema_pseudo_dice"], label=f"{r['trainer']} (held-out "
                        f"{r['mean_dice']:.2f})", linewidth=2)
        ax.plot(curve["seconds"], curve["pseudo_dice"], color=line.get_color(), alpha=0.3, linewidth=1)
    ax.set_xlabel("training wall-clock seconds")
    ax.set_ylabel("pseudo-Dice (validation patches; thick: moving average)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def benchmark_trainer(trainer: str, args, env: dict, raw: Path) -> dict:
    train_env = {**env, "NNUNET_DIFFUSION_TIME_BUDGET": str(args.budget), "NNUNET_DIFFUSION_EPOCHS": "1000",
                 "NNUNET_DIFFUSION_ITERATIONS": str(args.iterations_per_epoch),
                 "NNUNET_DIFFUSION_VAL_ITERATIONS": str(args.val_iterations), "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"}
    _, train_peak = run_measured(["nnUNetv2_train", str(args.dataset_id), args.configuration, "0", "-tr", trainer,
                                  "-p", args.plans, "-device", args.device], train_env)
    model = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__{args.plans}__{args.configuration}"
    timing = json.loads((model / "fold_0" / "training_time.json").read_text())
    row = {"trainer": trainer, "iterations": timing["iterations"], "s_per_it": timing["seconds_per_iteration"],
           "train_peak_mib": train_peak, "train_peak_gpu_mib": timing.get("peak_gpu_mib"),
           "curve": pseudo_dice_curve(model / "fold_0" / "checkpoint_final.pth")}
    return {**row, **predict_and_evaluate(trainer, trainer, args, env, raw)}


def network_calls(model: Path, configuration: str, sampler_env: dict) -> int:
    """Sequential network calls per window of the model's sampler (stored settings, overrides applied): 1 for a
    plain network, K for K reverse steps, K + 2 for UniSegDiff's staged sampler (K middle DDIM steps)."""
    stored = json.loads((model / "plans.json").read_text())["configurations"][configuration].get("diffusion")
    if stored is None:
        return 1
    kind = sampler_env.get("NNUNET_DIFFUSION_SAMPLER", stored["sampler"]["kind"])
    steps = int(sampler_env.get("NNUNET_DIFFUSION_STEPS", stored["sampler"]["steps"]))
    return steps + 2 if kind == "staged" else steps


def predict_and_evaluate(label: str, trainer: str, args, env: dict, raw: Path, sampler_env: dict | None = None) -> dict:
    """Predict the held-out cases (``--predict-with``: nnUNetv2_predict, one window per network call, or
    nnunet-diffusion predict, windows batched), without mirroring unless ``--mirroring``, and evaluate them."""
    sampler_env = sampler_env or {}
    model = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__{args.plans}__{args.configuration}"
    out = Path(args.work) / "predictions" / f"{Path(env['nnUNet_results']).name}_{label}"
    cases = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    command = ["nnUNetv2_predict"] if args.predict_with == "nnUNetv2_predict" else ["nnunet-diffusion", "predict"]
    predict_seconds, predict_peak = run_measured(
        [*command, "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(args.dataset_id), "-c",
         args.configuration, "-tr", trainer, "-p", args.plans, "-f", "0", "-device", args.device, "-npp", "0", "-nps", "0",
         *([] if args.mirroring else ["--disable_tta"])], {**env, **sampler_env})
    run_measured(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(model / "dataset.json"),
                  "-pfile", str(model / "plans.json")], env)
    summary = json.loads((out / "summary.json").read_text())
    return {"s_per_case": predict_seconds / len(cases), "predict_peak_mib": predict_peak,
            "network_calls": network_calls(model, args.configuration, sampler_env),
            "dice": {k: v["Dice"] for k, v in summary["mean"].items()}, "mean_dice": summary["foreground_mean"]["Dice"]}


def parse_predict_variant(text: str):
    """'label=TRAINER:NAME=VALUE,NAME=VALUE' -> (label, trainer, {NAME: VALUE})."""
    label, rest = text.split("=", 1)
    trainer, _, assignments = rest.partition(":")
    return label, trainer, dict(a.split("=", 1) for a in assignments.split(",") if a)


def ratio(value: float, stock: float) -> str:
    return f"{value / stock:.2f}x" if stock else "n/a"


def write_table(rows: list[dict], labels: dict, args, command: str, elapsed: float) -> str:
    names = {str(v): k for k, v in labels.items() if v != 0}
    stock = next(r for r in rows if r["trainer"] == STOCK)
    gpu = int(stock.get("train_peak_gpu_mib") is not None)  # CUDA runs: torch.cuda.max_memory_allocated too
    lines = [f"# Benchmark: equal wall-clock training budget on the example data ({args.device})", "",
             f"Command: `{command}`", "",
             f"Budget: {args.budget} s of training per trainer (fold 0, {args.configuration}, plans {args.plans}"
             f"{f' from {args.planner}' if args.planner else ''}"
             f"{f', batch at most {args.max_batch_size}' if args.max_batch_size else ''}, "
             f"{args.iterations_per_epoch} "
             f"iterations per epoch, {args.val_iterations} validation iterations per epoch, final validation "
             f"skipped), then prediction of the {args.num_test} held-out cases "
             f"{'with mirroring along the stored axes' if args.mirroring else 'without mirroring'} and evaluation "
             f"against their labels. Dataset: {args.num_train} training cases at {args.spacing} mm (atlas {args.atlas}); mirroring (augmentation) "
             f"along axes {args.mirror_axes} only (NNUNET_DIFFUSION_MIRROR_AXES). "
             f"Whole run: {elapsed / 60:.0f} min. Ratios are against the stock trainer in this run.", "",
             "| trainer | iterations | mean Dice | " + " | ".join(names[k] for k in sorted(names, key=int)) +
             " | s/iteration | network calls per window | s/predicted case | peak MiB train | peak MiB predict |" +
             (" peak GPU MiB train |" if gpu else ""),
             "|---" * (8 + len(names) + gpu) + "|"]
    for r in rows:
        dice = " | ".join(f"{r['dice'].get(k, float('nan')):.3f}" for k in sorted(names, key=int))
        lines.append(
            f"| {r['trainer']} | {r['iterations']} | {r['mean_dice']:.3f} ({ratio(r['mean_dice'], stock['mean_dice'])})"
            f" | {dice} | {r['s_per_it']:.2f} ({ratio(r['s_per_it'], stock['s_per_it'])}) | {r.get('network_calls', '')}"
            f" | {r['s_per_case']:.1f} ({ratio(r['s_per_case'], stock['s_per_case'])})"
            f" | {r['train_peak_mib']:.0f} ({ratio(r['train_peak_mib'], stock['train_peak_mib'])})"
            f" | {r['predict_peak_mib']:.0f} ({ratio(r['predict_peak_mib'], stock['predict_peak_mib'])}) |" +
            (f" {r['train_peak_gpu_mib']:.0f} ({ratio(r['train_peak_gpu_mib'], stock['train_peak_gpu_mib'])}) |"
             if gpu else ""))
    best = max((r for r in rows if r["trainer"] in (STOCK, STOCK_ADAMW)), key=lambda r: r["mean_dice"])
    lines += ["", f"{STOCK} is the stock nnUNetTrainer with the NNUNET_DIFFUSION_* run-length variables; {STOCK_ADAMW} "
              "the stock network with nnU-Net's own AdamW trainer (nnUNetTrainerAdam1en3, lr 1e-3), the optimiser our "
              "trainers use. Diffusion trainers predict with their stored default sampler.", "",
              f"Against the better stock row ({best['trainer']}, {best['mean_dice']:.3f}): " +
              ", ".join(f"{r['trainer']} {ratio(r['mean_dice'], best['mean_dice'])}" for r in rows
                        if r["trainer"] not in (STOCK, STOCK_ADAMW)) + ".", "",
              f"Pseudo-Dice against training time: `{Path(args.out).with_suffix('.png').name}`.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300, help="training seconds per trainer")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--work", default="work_dirs/benchmark", help="folder for nnU-Net data and results")
    parser.add_argument("--out", default="benchmarks/results_cpu.md")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset-id", type=int, default=503)
    parser.add_argument("--spacing", type=float, default=5.0)
    parser.add_argument("--atlas", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                        help="the example's atlas (build-example --atlas): aal (Dataset503, 4 classes) or harvard_oxford "
                             "(the second dataset, 6 classes with a small one; use it with --dataset-id 505 --spacing 4)")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--mirror-axes", default="1", help="NNUNET_DIFFUSION_MIRROR_AXES (default: left-right of a "
                        "2d slice; the example's labels are symmetric only left-right)")
    parser.add_argument("--planner", default=None, choices=sorted(PLANNER_PLANS), help="nnU-Net's planner "
                        "(nnUNetv2_plan_and_preprocess -pl), e.g. its Residual Encoder presets; default: its default")
    parser.add_argument("--plans", default="nnUNetPlans_CPU", help="plans identifier; <planner's plans>_CPU (e.g. "
                        "nnUNetPlans_CPU, nnUNetResEncUNetMPlans_CPU) is derived (base 16 features, max 128) if "
                        "missing")
    parser.add_argument("--max-batch-size", type=int, default=None, help="cap the derived _CPU plans' batch size "
                        "(the ResEnc presets plan 647 2d patches for the example; the default planner 32)")
    parser.add_argument("--num-train", type=int, default=24)
    parser.add_argument("--num-test", type=int, default=6)
    parser.add_argument("--iterations-per-epoch", type=int, default=25)
    parser.add_argument("--val-iterations", type=int, default=3)
    parser.add_argument("--mirroring", action="store_true", help="predict with mirroring (the model's stored axes; "
                        "nnU-Net's default) instead of --disable_tta")
    parser.add_argument("--predict-with", choices=["nnUNetv2_predict", "nnunet-diffusion"], default="nnUNetv2_predict",
                        help="nnunet-diffusion predict batches windows (same result for deterministic samplers)")
    parser.add_argument("--condition-stock", default=STOCK, choices=[STOCK, STOCK_ADAMW],
                        help="which stock row's model --condition-from-stock gives UniSegDiff (default: the SGD one)")
    parser.add_argument("--condition-from-stock", action="store_true", help="UniSegDiff trainers take this run's "
                        "--condition-stock model as their pre-trained CFENet (NNUNET_DIFFUSION_CONDITION_CHECKPOINT)")
    parser.add_argument("--predict-variants", nargs="*", default=[], metavar="LABEL=TRAINER:VAR=VALUE,...",
                        help="extra rows: re-predict a trained model with sampler variables, e.g. "
                             "'UniSegDiff_mean=nnUNetTrainerUniSegDiff:NNUNET_DIFFUSION_FUSION=mean'")
    args = parser.parse_args(argv)
    if STOCK not in args.trainers or STOCK_ADAMW not in args.trainers:
        parser.error(f"--trainers must include {STOCK} (every figure is a ratio to it) and {STOCK_ADAMW} (the stock "
                     f"network with our optimiser)")
    command = "python benchmarks/run_benchmark.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    work = Path(args.work).resolve()
    results = work / f"results_{time.strftime('%Y%m%d_%H%M%S')}"  # never train over an earlier run's results
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(results), "nnUNet_extTrainer": trainer_path(), "nnUNet_def_n_proc": "1",
           # nnU-Net compiles on CUDA (the stock network whole, ours their step networks): ~50 s of compilation would be
           # charged to the stock trainer's budget (seen on an H100: 1 iteration in a 20 s budget)
           "nnUNet_compile": os.environ.get("nnUNet_compile", "f"),
           # the nnUNetv2_* commands of the Python running this script, even if its venv is not activated
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    existing = sorted(Path(env["nnUNet_raw"]).glob(f"Dataset{args.dataset_id:03d}_*"))
    raw = existing[0] if existing else Path(build_example_dataset(
        env["nnUNet_raw"], args.dataset_id, "BrainAtlasBench" if args.atlas == DEFAULT_RECIPE else "BrainAtlasHOBench",
        args.num_train, args.num_test, args.spacing, seed=0, recipe=args.atlas))
    built_with = json.loads((raw / "dataset.json").read_text()).get("generator", {}).get("recipe", DEFAULT_RECIPE)
    if built_with != args.atlas:
        parser.error(f"{raw} exists with another atlas than --atlas {args.atlas}: use another --dataset-id or --work")
    planner = args.planner or "ExperimentPlanner"
    source_plans = PLANNER_PLANS[planner]
    if args.plans not in (source_plans, f"{source_plans}_CPU"):
        parser.error(f"--plans {args.plans}: the planner {planner} writes {source_plans} (and this script derives "
                     f"{source_plans}_CPU from it)")
    if not (Path(env["nnUNet_preprocessed"]) / raw.name / f"{source_plans}_{args.configuration}").is_dir():
        run_measured(["nnUNetv2_plan_and_preprocess", "-d", str(args.dataset_id), "-c", args.configuration, "-np", "2",
                      "-pl", planner, "--verify_dataset_integrity"],
                     {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"})
    if args.plans != source_plans and not (Path(env["nnUNet_preprocessed"]) / raw.name / f"{args.plans}.json").exists():
        write_small_plans(str(Path(env["nnUNet_preprocessed"]) / raw.name), source=source_plans, target=args.plans,
                          max_batch_size=args.max_batch_size)
    env["nnUNet_n_proc_DA"] = "0"
    env["NNUNET_DIFFUSION_MIRROR_AXES"] = args.mirror_axes
    rows, failed = [], {}
    for trainer in args.trainers:
        print(f"[benchmark] {trainer}", flush=True)
        trainer_env = env
        if args.condition_from_stock and "UniSegDiff" in trainer:
            stock_model = (Path(env["nnUNet_results"]) / raw.name /
                           f"{args.condition_stock}__{args.plans}__{args.configuration}")
            trainer_env = {**env, "NNUNET_DIFFUSION_CONDITION_CHECKPOINT":
                           str(stock_model / "fold_0" / "checkpoint_final.pth")}
        try:
            rows.append(benchmark_trainer(trainer, args, trainer_env, raw))
        except RuntimeError as error:  # one broken trainer must not cost the others' measurements
            failed[trainer] = str(error)[-2000:]
            print(f"[benchmark] {trainer} FAILED:\n{failed[trainer]}", flush=True)
            continue
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    for variant in args.predict_variants:
        label, trainer, sampler_env = parse_predict_variant(variant)
        trained = next((r for r in rows if r["trainer"] == trainer), None)
        if trained is None:
            failed[label] = f"{trainer} was not trained in this run"
            continue
        print(f"[benchmark] {label}: {trainer} predicted with {sampler_env}", flush=True)
        try:
            rows.append({**trained, "trainer": label, **predict_and_evaluate(label, trainer, args, env, raw,
                                                                             sampler_env)})
        except RuntimeError as error:
            failed[label] = str(error)[-2000:]
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    table = write_table(rows, labels, args, command, time.perf_counter() - started)
    Path(args.out).write_text(table)
    if failed:
        table += "\n## Failed\n\n" + "\n".join(f"- {t}: `{e.splitlines()[-1] if e else ''}`" for t, e in failed.items()) + "\n"
        Path(args.out).write_text(table)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "failed": failed},
                                                              indent=1))
    plot_curves(rows, Path(args.out).with_suffix(".png"), f"{Path(args.out).name}: {args.device}, {args.budget:.0f} s of "
                f"training per trainer, {args.configuration} (command in {Path(args.out).name})")
    print(table)


if __name__ == "__main__":
    main()
