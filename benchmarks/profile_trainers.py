"""Where each trainer's training iteration spends its time: seconds per iteration against the stock trainer and
the top operators of torch.profiler, per trainer, in one run.

Each trainer is built in its own process from the benchmark's plans exactly as ``nnUNetv2_train`` builds it
(``memory_benchmark.build_trainer``) and runs its real ``train_step`` on synthetic batches of the planned patch and
batch (``memory_benchmark.synthetic_batch``): one warm-up step, ``--iterations`` timed steps, then ``--profiled``
steps under torch.profiler. Writes a markdown file with the command that made it: a table of s/iteration (ratio to
the stock nnUNetTrainer of the same run) and, per trainer, its top operators by self time.

    python benchmarks/profile_trainers.py --plans-file PLANS.json --dataset-json dataset.json \\
        --configuration 2d --out benchmarks/profiles/profile_cpu_2d.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_benchmark import build_trainer, synthetic_batch  # noqa: E402

STOCK = "nnUNetTrainer"
DEFAULT_TRAINERS = [STOCK, "nnUNetTrainerCrossTimestep", "nnUNetTrainerUniSegDiff", "nnUNetTrainerTextDiffSeg",
                    "nnUNetTrainerDSM", "nnUNetTrainerDiffSegRecycling"]


def profile_one(trainer_name: str, args) -> dict:
    """s/iteration of ``args.iterations`` steps and the top ``args.top`` operators over ``args.profiled`` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    trainer = build_trainer(trainer_name, args.plans_file, args.dataset_json, args.configuration, args.device)
    trainer.network.train()
    if hasattr(trainer, "condition_pretrain_fraction"):
        trainer.condition_pretrain_fraction = 0.0  # UniSegDiff: the DNet phase, not CFENet's pre-training
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(trainer, generator) for _ in range(2)]
    trainer.train_step(batches[0])  # warm-up
    tic = time.perf_counter()
    for i in range(args.iterations):
        trainer.train_step(batches[(i + 1) % 2])
    seconds = (time.perf_counter() - tic) / args.iterations
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.profiled):
            trainer.train_step(batches[i % 2])
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort), reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [{"op": e.key, "calls": e.count // args.profiled, "self_ms_per_it": e.self_cpu_time_total / 1e3 / args.profiled,
            "share": e.self_cpu_time_total / total} for e in events[:args.top]]
    return {"trainer": trainer_name, "s_per_it": seconds, "top": top,
            "parameters_m": sum(p.numel() for p in trainer.network.parameters()) / 1e6}


def write_markdown(rows: list[dict], command: str, args) -> str:
    stock = next((r["s_per_it"] for r in rows if r["trainer"] == STOCK), None)
    lines = [f"# Training-step profile ({args.device}, {args.configuration})", "", f"Command: `{command}`", "",
             f"Each trainer: its real train_step on synthetic batches of the planned patch and batch, "
             f"{args.iterations} timed steps after one warm-up, then {args.profiled} steps under torch.profiler. "
             f"Ratios against the stock nnUNetTrainer of this run"
             f"{f'; s/iteration is the median over {args.rounds} rounds of every trainer in turn (each round its own processes)' if args.rounds > 1 else ''}"
             f".", "",
             "| trainer | s/iteration | vs stock | parameters (M) |", "|---|---|---|---|"]
    for r in rows:
        rel = f"{r['s_per_it'] / stock:.2f}x" if stock else "-"
        lines.append(f"| {r['trainer']} | {r['s_per_it']:.3f} | {rel} | {r['parameters_m']:.2f} |")
    for r in rows:
        lines += ["", f"## {r['trainer']}", "", "| operator | calls per step | self ms per step | share of self time |",
                  "|---|---|---|---|"]
        lines += [f"| `{t['op']}` | {t['calls']} | {t['self_ms_per_it']:.1f} | {t['share']:.0%} |" for t in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--plans-file", required=True)
    parser.add_argument("--dataset-json", required=True)
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--profiled", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1, help="run every trainer in turn this many times and report "
                        "the median s/iteration (a shared machine's noise hits every trainer alike)")
    parser.add_argument("--out", default="benchmarks/profiles/profile_cpu_2d.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(profile_one(args.one, args)))
        return
    from nnunet_diffusion.cli import trainer_path
    command = "python benchmarks/profile_trainers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    runs = {trainer: [] for trainer in args.trainers}
    with tempfile.TemporaryDirectory() as results:  # the trainers' output folders (and a stage-2 trainer's stage 1)
        env = {**os.environ, "nnUNet_extTrainer": trainer_path(), "nnUNet_results": results}
        for _ in range(args.rounds):
            for trainer in args.trainers:
                cmd = [sys.executable, __file__, "--one", trainer, *(argv if argv is not None else sys.argv[1:])]
                result = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{trainer} failed:\n{result.stderr[-3000:]}")
                runs[trainer].append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(trainer, f"{runs[trainer][-1]['s_per_it']:.3f} s/it", flush=True)
    rows = []
    for trainer, results in runs.items():  # the round with the median s/iteration, its profile included
        rows.append(sorted(results, key=lambda r: r["s_per_it"])[len(results) // 2])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(write_markdown(rows, command, args))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
