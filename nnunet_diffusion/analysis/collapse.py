"""Initial-stage collapse analysis (Cross-Timestep, Figs. 3 and 4) for trained nnU-Net diffusion models.

For validation cases of a fold (nnU-Net's own split, preprocessed data, the central patch of each case):
(2d models: the slice of each case with the most foreground)
1. start sweep: noise the ground truth to a start timestep t_s, run the reverse process from there with the
   model's sampler, record the Dice of the final mask (Fig. 3: collapse = Dice falls as t_s approaches T);
2. trajectory: one reverse run from pure noise, recording at every step the Dice of the main output (the
   step's x0 estimate) and, for APDS models, of the prior decoder's output (Fig. 4).
Writes collapse.csv and collapse.png. Usage: ``nnunet-diffusion collapse-analysis --help``.
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch

from nnunet_diffusion.diffusion.gaussian import q_sample
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import SamplerSettings


def dice_per_class(prediction: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Hard Dice of integer maps (*S) for classes 1..C-1; nan where a class is absent from both."""
    scores = []
    for c in range(1, num_classes):
        p, g = prediction == c, labels == c
        denominator = int(p.sum() + g.sum())
        scores.append(float("nan") if denominator == 0 else 2 * int((p & g).sum()) / denominator)
    return scores


def central_patch(array: np.ndarray, patch_size) -> np.ndarray:
    """(C, *S) -> (C, *patch): centre crop, zero-padded where the case is smaller than the patch."""
    out = np.zeros((array.shape[0], *patch_size), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for size, patch in zip(array.shape[1:], patch_size):
        start = max(0, (size - patch) // 2)
        length = min(size, patch)
        offset = max(0, (patch - size) // 2)
        src.append(slice(start, start + length))
        dst.append(slice(offset, offset + length))
    out[tuple(dst)] = array[tuple(src)]
    return out


def load_model(model_folder: str, fold: int, checkpoint: str, device: torch.device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(device=device, verbose=False)
    predictor.initialize_from_trained_model_folder(model_folder, (fold,), checkpoint)
    return predictor.network.to(device).eval(), predictor


def validation_patches(predictor, fold: int, num_cases: int):
    """Yield (case id, image (1, C_img, *patch), labels (1, 1, *patch)) from nnU-Net's preprocessed split."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    base = Path(nnUNet_preprocessed) / predictor.plans_manager.dataset_name
    folder = str(base / predictor.configuration_manager.data_identifier)
    keys = load_json(str(base / "splits_final.json"))[fold]["val"][:num_cases]
    dataset = infer_dataset_class(folder)(folder, keys)
    patch = predictor.configuration_manager.patch_size
    for key in keys:
        data, seg, _, _ = dataset.load_case(key)
        data, seg = np.asarray(data, dtype=np.float32), np.clip(np.asarray(seg), 0, None).astype(np.int64)
        if len(patch) == data.ndim - 2:  # a 2d model of a 3d case: the slice with the most foreground
            z = int((seg[0] > 0).reshape(seg.shape[1], -1).sum(1).argmax())
            data, seg = data[:, z], seg[:, z]
        image = central_patch(data, patch)
        labels = central_patch(seg, patch)
        yield key, torch.from_numpy(image)[None], torch.from_numpy(labels)[None]


@torch.no_grad()
def analyse_case(network, image: torch.Tensor, labels: torch.Tensor, seed: int) -> list[dict]:
    """Rows for one case: the start sweep and the per-step trajectory (see module docstring)."""
    schedule, num_classes = network.sampling_schedule, network.num_classes
    x0 = labels_to_x0(labels, num_classes).to(image.dtype)
    rows = []

    def row(kind, t, output, x0_estimate_or_labels, is_labels=False):
        prediction = x0_estimate_or_labels if is_labels else x0_estimate_or_labels.argmax(1)
        scores = dice_per_class(prediction[0], labels[0, 0], num_classes)
        rows.append({"analysis": kind, "timestep": int(t), "output": output,
                     "mean_dice": float(np.nanmean(scores)) if not np.all(np.isnan(scores)) else float("nan"),
                     **{f"dice_{c + 1}": s for c, s in enumerate(scores)}})

    for k in range(1, schedule.num_steps):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
        x_start = q_sample(schedule, x0, torch.tensor([k]), noise)
        final = network.sample_x0(image, start_index=k, x_start=x_start)[:, 0]
        row("start_sweep", schedule.timesteps[k], "main", final)
    prior = getattr(network.denoiser.encode_image(image), "prior_logits", None)
    network.sample_x0(image, on_step=lambda k, x0_hat: row("trajectory", schedule.timesteps[k], "main", x0_hat))
    if prior is not None:  # the prior decoder sees only the image: one prediction, the same at every step
        for k in range(schedule.num_steps - 1, -1, -1):
            row("trajectory", schedule.timesteps[k], "apds_prior", prior)
    return rows


def plot(rows: list[dict], out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for trainer in sorted({r["trainer"] for r in rows}):
        for ax, kind in ((ax1, "start_sweep"), (ax2, "trajectory")):
            for output in ("main", "apds_prior"):
                sel = [r for r in rows if r["trainer"] == trainer and r["analysis"] == kind and r["output"] == output]
                if not sel:
                    continue
                ts = sorted({r["timestep"] for r in sel})
                mean = [np.nanmean([r["mean_dice"] for r in sel if r["timestep"] == t]) for t in ts]
                label = trainer.replace("nnUNetTrainer", "") + ("" if output == "main" else " (APDS prior)")
                ax.plot(ts, mean, marker="o", linestyle="-" if output == "main" else "--", label=label)
    ax1.set(xlabel="start timestep t_s (ground truth noised to t_s)", ylabel="mean foreground Dice",
            title="Reverse process started at t_s (Fig. 3)")
    ax2.set(xlabel="timestep along one reverse run from pure noise", ylabel="mean foreground Dice",
            title="Dice at each step (Fig. 4)")
    ax2.invert_xaxis()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion collapse-analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", default="3d_fullres", help="configuration")
    parser.add_argument("-tr", nargs="+", required=True, help="one or more trained diffusion trainers")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", type=int, default=0, help="fold (its validation cases are analysed)")
    parser.add_argument("-chk", default="checkpoint_final.pth")
    parser.add_argument("-o", required=True, help="output folder for collapse.csv and collapse.png")
    parser.add_argument("--cases", type=int, default=4, help="number of validation cases")
    parser.add_argument("--sampler", default=None, help="override the stored sampler kind (ddpm/ddim)")
    parser.add_argument("--steps", type=int, default=None, help="override the stored number of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-untrained", action="store_true", help="allow --steps whose timesteps the model "
                        "never trained on (refused otherwise, as at prediction): for analysis only")
    parser.add_argument("-device", default="cpu")
    args = parser.parse_args(argv)
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    out = Path(args.o)
    if (out / "collapse.csv").exists():
        parser.error(f"{out / 'collapse.csv'} exists: choose another -o (results are never overwritten)")
    dataset = maybe_convert_to_dataset_name(args.d)
    rows = []
    for trainer in args.tr:
        folder = os.path.join(nnUNet_results, dataset, f"{trainer}__{args.p}__{args.c}")
        network, predictor = load_model(folder, args.f, args.chk, torch.device(args.device))
        stored = network.sampler
        network.set_sampler(SamplerSettings(args.sampler or stored.kind, args.steps or stored.steps, 1, args.seed),
                            allow_untrained=args.allow_untrained)
        for key, image, labels in validation_patches(predictor, args.f, args.cases):
            device = torch.device(args.device)
            for r in analyse_case(network, image.to(device), labels.to(device), args.seed):
                rows.append({"trainer": trainer, "case": key, **r})
            print(f"[collapse] {trainer} {key} done", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "collapse.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "collapse.png")
    print(f"wrote {out / 'collapse.csv'} and {out / 'collapse.png'}")
    return 0
