"""Learning curves of nnU-Net's SGD against AdamW for each diffusion trainer, from a benchmark run's JSON.

    python benchmarks/plot_optimizers.py benchmarks/results_cpu.json -o benchmarks/optimizers/curves.png

The benchmark (run_benchmark.py, with each trainer and its ``_AdamW`` variant in ``--trainers``) trains every
trainer for the same wall-clock budget; this draws, per trainer, the per-epoch pseudo-Dice (thin) and its moving
average (thick) of both optimisers against training seconds, the stock trainer's in grey, with the held-out
mean Dice in the legend, and writes a markdown summary beside the PNG.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

STOCK = "nnUNetTrainerBudget"
SUFFIX = "_AdamW"


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(SGD row, AdamW row) for every trainer measured with both."""
    by_name = {r["trainer"]: r for r in rows}
    return [(by_name[name[: -len(SUFFIX)]], row) for name, row in by_name.items()
            if name.endswith(SUFFIX) and name[: -len(SUFFIX)] in by_name]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_json")
    p.add_argument("-o", "--out", default="benchmarks/optimizers/curves.png")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    data = json.loads(Path(args.results_json).read_text())
    rows, found = data["rows"], pairs(data["rows"])
    if not found:
        raise SystemExit(f"no trainer with both SGD and {SUFFIX} rows in {args.results_json}")
    stock = next((r for r in rows if r["trainer"] == STOCK), None)
    fig, axes = plt.subplots(1, len(found), figsize=(5.5 * len(found), 4.2), squeeze=False)
    lines = [f"# SGD vs AdamW, from `{args.results_json}`", "", f"Benchmark command: `{data['command']}`", "",
             f"Plot command: `python benchmarks/plot_optimizers.py {args.results_json} -o {args.out}`", "",
             "| trainer | SGD (nnU-Net: lr 1e-2, momentum 0.99) held-out mean Dice | AdamW (lr 1e-3) | iterations SGD / AdamW |",
             "|---|---|---|---|"]
    for ax, (sgd, adamw) in zip(axes[0], found):
        for row, colour in ((sgd, "tab:blue"), (adamw, "tab:red")) + (((stock, "grey"),) if stock else ()):
            curve = row["curve"]
            label = f"{row['trainer']} ({row['mean_dice']:.2f})"
            ax.plot(curve["seconds"], curve["ema_pseudo_dice"], color=colour, linewidth=2, label=label)
            ax.plot(curve["seconds"], curve["pseudo_dice"], color=colour, linewidth=1, alpha=0.3)
        ax.set_title(sgd["trainer"], fontsize=9)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("pseudo-Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        lines.append(f"| {sgd['trainer']} | {sgd['mean_dice']:.3f} | {adamw['mean_dice']:.3f} | "
                     f"{sgd['iterations']} / {adamw['iterations']} |")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
