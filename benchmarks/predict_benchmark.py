"""Prediction cost of every trainer: the stock ``nnUNetv2_predict`` against ``nnunet-diffusion predict``.

Uses models that are already trained (e.g. by ``run_benchmark.py``; ``--results`` is their nnUNet_results, and
``--extra-results`` adds folders from other runs) and the held-out cases of the example dataset in ``--work``.
For every trainer and mirroring setting (off: --disable_tta; on: the model's stored mirror axes) it runs

  - nnUNetv2_predict (stock command),
  - nnunet-diffusion predict (ours),
  - nnunet-diffusion predict --uncertainty (mirroring on only),

each with -npp 0 -nps 0 on the same machine, one after another, each in a fresh process that builds the
predictor as the command does and times only the prediction (s/case: what a long prediction run pays per case;
start-up and model loading are reported apart); peak memory is that process's max RSS. Dice is evaluated on our command's output. ``--steps`` adds rows of ours with fewer sampler steps
(for the trainers that accept them), to measure what a cheaper default costs in Dice; ``--max-batch`` rows of ours
with another --max_batch; ``--commands`` and ``--mirroring`` pick the base rows.

    python benchmarks/predict_benchmark.py --work /work/bench --results /work/bench/results_X --out benchmarks/predict_cpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmark import STOCK, ratio, run_measured  # noqa: E402  (one measuring helper for both benchmarks)

from nnunet_diffusion.cli import trainer_path  # noqa: E402

COMMANDS = {"stock": (), "ours": (), "ours --uncertainty": ("--uncertainty",)}  # base rows: name -> extra flags
TRAINERS = [STOCK, "nnUNetTrainerDiffSegRecycling", "nnUNetTrainerDiffusion", "nnUNetTrainerDiffusion_x0",
            "nnUNetTrainerCrossTimestep"]


def time_one(kind: str, argv: list[str]) -> None:
    """In this process: build the predictor the command line asks for (ours, or nnU-Net's nnUNetPredictor exactly
    as nnUNetv2_predict builds it), then predict; print the model-loading and the prediction seconds."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_diffusion.inference.command import build_parser, make_predictor, predict_cases
    args = build_parser().parse_args(argv)
    tic = time.perf_counter()
    if kind == "ours":
        predictor = make_predictor(args)
    else:
        torch.set_num_threads(os.cpu_count())
        predictor = nnUNetPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                                    device=torch.device(args.device), allow_tqdm=not args.disable_progress_bar)
        predictor.initialize_from_trained_model_folder(get_output_folder(args.d, args.tr, args.p, args.c),
                                                       [int(f) for f in args.f], checkpoint_name=args.chk)
    loaded = time.perf_counter()
    if kind == "ours":
        predict_cases(args, predictor)
    else:  # nnUNetv2_predict's path for -npp 0 -nps 0
        os.makedirs(args.o, exist_ok=True)
        predictor.predict_from_files_sequential(args.i, args.o, overwrite=not args.continue_prediction)
    print("TIMING", json.dumps({"load_s": loaded - tic, "predict_s": time.perf_counter() - loaded}), flush=True)


def predict(command: str, trainer: str, out: Path, args, env: dict, mirror: bool, extra=()) -> dict:
    """Predict the held-out cases with one command in a fresh process; time the prediction itself (start-up, imports
    and model loading excluded: with 6 small cases they would be most of the wall time)."""
    base = ["nnUNetv2_predict"] if command == "stock" else ["nnunet-diffusion", "predict"]
    flags = ["-i", str(args.images), "-o", str(out), "-d", str(args.dataset_id), "-c", args.configuration,
             "-tr", trainer, "-p", args.plans, "-f", "0", "-device", args.device, "-npp", "0", "-nps", "0",
             "--disable_progress_bar", *([] if mirror else ["--disable_tta"]), *extra]
    shutil.rmtree(out, ignore_errors=True)
    seconds, peak, stdout = run_measured([sys.executable, __file__, "--time-one", command, *flags], env,
                                         return_stdout=True)
    timing = json.loads(next(line for line in stdout.splitlines() if line.startswith("TIMING"))[len("TIMING"):])
    cases = len(list(Path(args.images).glob("*_0000.nii.gz")))
    return {"wall_s": seconds, "load_s": timing["load_s"], "s_per_case": timing["predict_s"] / cases,
            "peak_mib": peak, "command": shlex.join(base + flags)}


def dice(out: Path, model: Path, args, env: dict) -> float:
    run_measured(["nnUNetv2_evaluate_folder", str(args.labels), str(out), "-djfile", str(model / "dataset.json"),
                  "-pfile", str(model / "plans.json")], env)
    return json.loads((out / "summary.json").read_text())["foreground_mean"]["Dice"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--time-one"]:
        return time_one(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="run_benchmark.py's --work (raw and preprocessed data)")
    parser.add_argument("--results", required=True, help="nnUNet_results holding the trained models")
    parser.add_argument("--extra-results", nargs="*", default=[], help="more nnUNet_results folders to take "
                        "trainers from (linked into a combined folder)")
    parser.add_argument("--trainers", nargs="+", default=TRAINERS)
    parser.add_argument("--steps", nargs="*", type=int, default=[], help="extra rows: ours with --steps N")
    parser.add_argument("--max-batch", nargs="*", type=int, default=[], help="extra rows: ours with --max_batch N")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS),
                        help="which of the base rows to run (stock: nnUNetv2_predict; the extra rows always run)")
    parser.add_argument("--mirroring", choices=["off", "on", "both"], default="both")
    parser.add_argument("--out", default="benchmarks/predict_cpu.md")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset-id", type=int, default=503)
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--plans", default="nnUNetPlans_CPU")
    args = parser.parse_args(argv)
    command = "python benchmarks/predict_benchmark.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    work = Path(args.work).resolve()
    raw = next((work / "raw").glob(f"Dataset{args.dataset_id:03d}_*"))
    args.images, args.labels = raw / "imagesTs", raw / "labelsTs"
    results = work / "results_predict_benchmark"  # links to every model, so that one nnUNet_results finds them all
    for source in [args.results, *args.extra_results]:
        for model in (Path(source) / raw.name).glob("*__*__*"):
            link = results / raw.name / model.name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(model.resolve())
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(results), "nnUNet_extTrainer": trainer_path(), "nnUNet_def_n_proc": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    rows, failed = [], {}
    started = time.perf_counter()
    for trainer in args.trainers:
        model = results / raw.name / f"{trainer}__{args.plans}__{args.configuration}"
        mirrorings = {"off": (False,), "on": (True,), "both": (False, True)}[args.mirroring]
        variants = [(m, c, COMMANDS[c]) for m in mirrorings for c in args.commands
                    if m or c != "ours --uncertainty"]
        variants += [(m, f"ours --steps {k}", ("--steps", str(k))) for m in mirrorings for k in args.steps
                     if trainer != STOCK]
        variants += [(m, f"ours --max_batch {k}", ("--max_batch", str(k))) for m in mirrorings for k in args.max_batch
                     if trainer != STOCK]
        for mirror, name, extra in variants:
            print(f"[predict benchmark] {trainer} {name} mirroring={'on' if mirror else 'off'}", flush=True)
            out = work / "predict_benchmark" / f"{trainer}_{name.replace(' ', '_')}_{'tta' if mirror else 'notta'}"
            try:
                row = predict("stock" if name == "stock" else "ours", trainer, out, args, env, mirror, extra)
                row.update(trainer=trainer, variant=name, mirror=mirror, dice=dice(out, model, args, env))
            except RuntimeError as error:  # e.g. a --steps value the model was not trained for
                errors = [line for line in str(error).splitlines() if "Error" in line] or [str(error)]
                failed[f"{trainer} {name} {'tta' if mirror else 'notta'}"] = errors[-1].strip()[:300]
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = write_table(rows, failed, command, args, time.perf_counter() - started)
    Path(args.out).write_text(table)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "failed": failed},
                                                              indent=1))
    print(table)


def write_table(rows, failed, command, args, elapsed) -> str:
    reference = {m: next((r for r in rows if r["trainer"] == STOCK and r["variant"] == "stock" and r["mirror"] == m),
                         None) for m in (False, True)}
    lines = [f"# Prediction cost: nnUNetv2_predict against nnunet-diffusion predict ({args.device})", "",
             f"Command: `{command}`", "",
             f"{len(list(Path(args.images).glob('*_0000.nii.gz')))} held-out cases, {args.configuration}, plans "
             f"{args.plans}, fold 0, -npp 0 -nps 0, one command after another on this machine; whole run "
             f"{elapsed / 60:.0f} min. s/case is the prediction time per case in the command's process, without "
             f"start-up and model loading ('load s'). Ratios: against the stock trainer's nnUNetv2_predict with the same "
             f"mirroring setting. Mirroring 'on' uses each model's stored axes (left-right here).", "",
             "| trainer | command | mirroring | s/case | vs stock trainer | load s | peak MiB | vs stock trainer "
             "| mean Dice |", "|---" * 9 + "|"]
    for r in rows:
        ref = reference[r["mirror"]]
        lines.append(f"| {r['trainer']} | {r['variant']} | {'on' if r['mirror'] else 'off'} | {r['s_per_case']:.2f} | "
                     f"{ratio(r['s_per_case'], ref['s_per_case']) if ref else 'n/a'} | {r['load_s']:.1f} | "
                     f"{r['peak_mib']:.0f} | {ratio(r['peak_mib'], ref['peak_mib']) if ref else 'n/a'} | "
                     f"{r['dice']:.3f} |")
    if failed:
        lines += ["", "Failed:", ""] + [f"- {k}: `{v}`" for k, v in failed.items()]
    lines += ["", "Exact commands: the `command` of each row in the .json beside this file.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
