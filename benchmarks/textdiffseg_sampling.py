"""Where TextDiffSeg's sampled Dice is lost: a trained 2d model's label autoencoder, its DDIM samples and its
one-step x0 estimates, beside the stock models of the same benchmark run, on the held-out slices of fold 0.

For every foreground slice of the fold's validation cases (none of them trained on), zero-padded to the patch as
nnU-Net's sliding window pads a slice smaller than its window (one window per slice):

- ``stock``: each stock model's argmax, the anchor of the run;
- ``autoencoder``: decode(encode(ground truth)), the ceiling any sampled latent can reach;
- ``ddim K steps, seed s``: one sample per slice (the trainer's sampler with K steps and seed s);
- ``mean of S samples``: the class probabilities of the seeds averaged (the ``mean`` fusion of ``--samples``);
- ``x0 estimate at t``: the denoiser's x0 estimate from q(z_t | z_0) of the true latent, clipped as the sampler clips:
  how well it reads the image at each noise level when the trajectory is right.

Dice is pooled over the slices (all voxels of a class together), per class, then averaged over the classes.

    python benchmarks/textdiffseg_sampling.py --results /work/bench/results_20261201_191445 \\
        --out benchmarks/results_cpu_textdiffseg_sampling.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from nnunet_diffusion.analysis.collapse import central_patch, dice_per_class, load_model
from nnunet_diffusion.architectures.textdiffseg.segmenter import LATENT_CLIP
from nnunet_diffusion.diffusion.gaussian import q_sample, x0_from_eps

DATASET = "Dataset503_BrainAtlasBench"
TRAINER = "nnUNetTrainerTextDiffSeg"
STOCK = ("nnUNetTrainerBudget", "nnUNetTrainerBudgetAdam1en3")


def held_out_slices(predictor, fold: int, min_foreground: int = 20):
    """(S, C_img, *patch) images and (S, *patch) labels: every slice of the fold's validation cases with at least
    ``min_foreground`` foreground voxels, zero-padded (centred) to the 2d patch."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    base = Path(nnUNet_preprocessed) / predictor.plans_manager.dataset_name
    folder = str(base / predictor.configuration_manager.data_identifier)
    keys = load_json(str(base / "splits_final.json"))[fold]["val"]
    dataset, patch = infer_dataset_class(folder)(folder, keys), predictor.configuration_manager.patch_size
    images, labels = [], []
    for key in keys:
        data, seg, _, _ = dataset.load_case(key)
        data, seg = np.asarray(data, dtype=np.float32), np.clip(np.asarray(seg), 0, None).astype(np.int64)
        for z in range(data.shape[1]):
            if (seg[0, z] > 0).sum() >= min_foreground:
                images.append(central_patch(data[:, z], patch))
                labels.append(central_patch(seg[:, z], patch)[0])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)), keys


def score(prediction: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    per_class = dice_per_class(prediction, labels, num_classes)
    return {"mean_dice": float(np.nanmean(per_class)), "per_class": [round(v, 3) for v in per_class]}


@torch.no_grad()
def analyse(results: Path, fold: int, seeds: int, steps: list[int], timesteps: list[int]) -> dict:
    device = torch.device("cpu")
    network, predictor = load_model(str(results / DATASET / f"{TRAINER}__nnUNetPlans_CPU__2d"), fold,
                                    "checkpoint_final.pth", device)
    images, labels, keys = held_out_slices(predictor, fold)
    n, rows = network.num_classes, []
    for stock in STOCK:
        model, _ = load_model(str(results / DATASET / f"{stock}__nnUNetPlans_CPU__2d"), fold, "checkpoint_final.pth",
                              device)
        logits = model(images)
        rows.append({"what": f"stock: {stock}", **score((logits[0] if isinstance(logits, (list, tuple)) else logits)
                                                        .argmax(1), labels, n)})
    onehot = torch.nn.functional.one_hot(labels, n).movedim(-1, 1).float()
    z0 = network.denoiser.encode_labels(onehot)
    rows.append({"what": "autoencoder: decode(encode(truth))", **score(network.denoiser.decode_labels(z0).argmax(1),
                                                                       labels, n)})
    stored = network.sampler
    for k in steps:
        probabilities = []
        for seed in range(seeds):
            network.set_sampler(replace(stored, steps=k, seed=seed, num_samples=1))
            probabilities.append(network.member_probabilities(images)[:, 0])
            rows.append({"what": f"ddim {k} steps, seed {seed}", **score(probabilities[-1].argmax(1), labels, n)})
        rows.append({"what": f"ddim {k} steps, mean of {seeds} samples",
                     **score(torch.stack(probabilities).mean(0).argmax(1), labels, n)})
    network.set_sampler(stored)
    condition = network.denoiser.encode_image(images)
    for t in timesteps:
        tt = torch.full((images.shape[0],), t, dtype=torch.long)
        z_t = q_sample(network.schedule, z0, tt, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)))
        eps = network.denoise(z_t, network.model_timesteps(tt), condition)
        estimate = x0_from_eps(network.schedule, z_t, tt, eps).clamp(-LATENT_CLIP, LATENT_CLIP)
        rows.append({"what": f"x0 estimate at t = {t} (from q(z_t | z_0))",
                     **score(network.denoiser.decode_labels(estimate).argmax(1), labels, n),
                     "latent_mse": round(float(((estimate - z0) ** 2).mean()), 4)})
    return {"slices": int(images.shape[0]), "cases": keys, "latent_abs_max": round(float(z0.abs().max()), 2),
            "latent_beyond_clip": round(float((z0.abs() > LATENT_CLIP).float().mean()), 5), "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="nnUNet_results of a run_benchmark.py run that "
                        f"trained {TRAINER} and {', '.join(STOCK)} on {DATASET}")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 4, 2, 1])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 800, 500, 200, 50])
    parser.add_argument("--out", type=Path, required=True, help="markdown file; the JSON goes beside it")
    args = parser.parse_args(argv)
    result = analyse(args.results, args.fold, args.seeds, args.steps, args.timesteps)
    command = "python benchmarks/textdiffseg_sampling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result["command"] = command
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# TextDiffSeg: where the sampled Dice is lost ({result['slices']} held-out slices of fold "
             f"{args.fold}: {', '.join(result['cases'])})", "", f"Command: `{command}`", "",
             f"Models: `{args.results}` (one run_benchmark.py run: {TRAINER} and both stock rows, same budget). "
             f"Normalised label latent of the truth: max |z| {result['latent_abs_max']}, fraction beyond the "
             f"sampler's clip (+-{LATENT_CLIP}) {result['latent_beyond_clip']}.", "",
             "| what | mean Dice | per class | latent MSE |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['what']} | {row['mean_dice']:.3f} | {row['per_class']} | {row.get('latent_mse', '')} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
