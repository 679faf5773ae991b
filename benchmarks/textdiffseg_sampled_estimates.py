"""The same trained TextDiffSeg models sampled with each ``sampled_estimate`` (segmenter.SAMPLED_ESTIMATES) and
several sampler seeds: what the sampler's treatment of the x0 estimates is worth, with training held fixed.

    python benchmarks/textdiffseg_sampled_estimates.py --work /work/bench \\
        --models results_20261202_131206:nnUNetTrainerTextDiffSeg ... --seeds 0 1 2 \\
        --out benchmarks/results_cpu_textdiffseg_estimates.md

Each model is a trained fold 0 of ``run_benchmark.py`` (its nnUNet_results folder under --work, its trainer). Every
prediction is `nnunet-diffusion predict` with mirroring on the held-out images, the stored option replaced by the
one measured (nothing on disk changes), then nnUNetv2_evaluate_folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nnunet_diffusion.architectures.textdiffseg.segmenter import SAMPLED_ESTIMATES
from nnunet_diffusion.cli import trainer_path


def predict_with(estimate: str, argv: list) -> int:
    """Worker: `nnunet-diffusion predict argv` with every TextDiffSeg model's sampled_estimate set to ``estimate``."""
    from nnunet_diffusion.architectures.textdiffseg.options import TextDiffSegOptions
    from nnunet_diffusion.cli import main
    stored = TextDiffSegOptions.from_stored.__func__
    TextDiffSegOptions.from_stored = classmethod(
        lambda cls, block: dataclasses.replace(stored(cls, block), sampled_estimate=estimate))
    return main(["predict", *argv])


def measure(work: Path, results: str, trainer: str, estimate: str, seed: int, args) -> dict:
    raw = next((work / "raw").glob(f"Dataset{args.dataset_id:03d}_*"))
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / results), "nnUNet_extTrainer": trainer_path(), "nnUNet_def_n_proc": "1",
           "nnUNet_n_proc_DA": "0", "NNUNET_DIFFUSION_SEED": str(seed), "NNUNET_DIFFUSION_SAMPLES": str(args.samples)}
    model = work / results / raw.name / f"{trainer}__{args.plans}__{args.configuration}"
    out = work / "predictions" / f"estimates_{results}_{trainer}_{estimate}_seed{seed}_samples{args.samples}"
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", estimate, "-i", str(raw / "imagesTs"), "-o", str(out),
                    "-d", str(args.dataset_id), "-c", args.configuration, "-tr", trainer, "-p", args.plans, "-f", "0",
                    "-device", "cpu", "-npp", "0", "-nps", "0"], env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    subprocess.run(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(model / "dataset.json"),
                    "-pfile", str(model / "plans.json")], env=env, check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    cases = len(list((raw / "imagesTs").glob("*_0000.nii.gz")))
    return {"results": results, "trainer": trainer, "estimate": estimate, "seed": seed, "s_per_case": seconds / cases,
            "mean_dice": summary["foreground_mean"]["Dice"]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(predict_with(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="run_benchmark.py's --work folder")
    parser.add_argument("--models", nargs="+", required=True, metavar="RESULTS:TRAINER")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--estimates", nargs="+", default=list(SAMPLED_ESTIMATES), choices=SAMPLED_ESTIMATES)
    parser.add_argument("--samples", type=int, default=1, help="samples per patch (NNUNET_DIFFUSION_SAMPLES), mean fusion")
    parser.add_argument("--dataset-id", type=int, default=503)
    parser.add_argument("--plans", default="nnUNetPlans_CPU")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    command = "python benchmarks/textdiffseg_sampled_estimates.py " + " ".join(sys.argv[1:])
    rows = []
    for model in args.models:
        results, trainer = model.split(":")
        for estimate in args.estimates:
            for seed in args.seeds:
                rows.append(measure(Path(args.work), results, trainer, estimate, seed, args))
                print(json.dumps(rows[-1]), flush=True)
    lines = ["# TextDiffSeg: the sampler's x0 estimates clipped, standardised or projected, on the same trained models",
             "",
             f"Command: `{command}`", "",
             f"Held-out mean Dice of the test cases (mirroring), {args.samples} 10-step DDIM sample(s) per patch "
             "(mean of their probabilities), per sampler seed. "
             "'clipped': each x0 estimate of the latent clipped to +-5; 'standardised': first brought to mean 0 and "
             "std 1 per sample, as the label encoder's last step makes every true latent; 'projected': replaced by the "
             "latent of the label map it decodes to (decoded to class probabilities, re-encoded), but for the last one. Training is the "
             "same. s/case: "
             "the whole `nnunet-diffusion predict` process over the cases (start-up included).", "",
             "| model (nnUNet_results folder) | trainer | sampled estimate | " +
             " | ".join(f"seed {s}" for s in args.seeds) + " | mean | s/case (mean) |",
             "|---|---|---|" + "---|" * len(args.seeds) + "---|---|"]
    for model in args.models:
        results, trainer = model.split(":")
        for estimate in args.estimates:
            mine = [r for r in rows if (r["results"], r["trainer"], r["estimate"]) == (results, trainer, estimate)]
            dice = [r["mean_dice"] for r in mine]
            per_case = sum(r["s_per_case"] for r in mine) / len(mine)
            lines.append(f"| {results} | {trainer} | {estimate} | " + " | ".join(f"{d:.3f}" for d in dice) +
                         f" | {sum(dice) / len(dice):.3f} | {per_case:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
