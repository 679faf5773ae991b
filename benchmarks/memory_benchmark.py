"""Peak training memory and seconds per iteration of every trainer at the patch and batch nnU-Net plans.

nnU-Net plans its patch and batch for a GPU memory target; a trainer that needs far more than the stock trainer
does not fit the GPU the plan was made for. This benchmark plans a realistic dataset as a new user would
(nnU-Net's own ExperimentPlanner on a dataset fingerprint; default: lesion CT, 40 x 512 x 512 voxels at
5 x 0.8 x 0.8 mm, one CT channel, background + lesion), then, for each trainer in its own process, builds it
from those plans exactly as ``nnUNetv2_train`` does (``initialize``: network, optimizer, loss, GradScaler on
CUDA) and runs its real ``train_step`` on synthetic batches of the planned patch and batch size. It writes a
markdown table and a JSON file with the command that made them; ratios are against the stock nnUNetTrainer in
the same run.

    python benchmarks/memory_benchmark.py --device cuda --out benchmarks/memory_gpu.md

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the measured steps (model, optimizer state and
activations); on CPU the process's peak resident set (ru_maxrss, which includes Python and torch themselves).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOCK = "nnUNetTrainer"
DEFAULT_TRAINERS = [STOCK, "nnUNetTrainerDiffusion", "nnUNetTrainerDiffSegRecycling", "nnUNetTrainerCrossTimestep",
                    "nnUNetTrainerUniSegDiff"]
DATASET_ID = 998


def plan_dataset(root: Path, shape, spacing, configuration: str) -> tuple[Path, Path]:
    """Plan a dataset of ``shape`` voxels at ``spacing`` mm with nnU-Net's ExperimentPlanner from a written
    fingerprint (one tiny image on disk, which only tells the planner the file format). Returns the paths of
    nnUNetPlans.json and dataset.json."""
    import numpy as np
    import SimpleITK as sitk
    raw = root / "raw" / f"Dataset{DATASET_ID}_MemoryPlan"
    preprocessed = root / "preprocessed" / raw.name
    for folder in (raw / "imagesTr", raw / "labelsTr", preprocessed):
        folder.mkdir(parents=True, exist_ok=True)
    n = 10
    for i in range(n):
        for array, path in ((np.zeros((4, 4, 4), np.float32), raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                            (np.zeros((4, 4, 4), np.uint8), raw / "labelsTr" / f"case_{i:03d}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": n,
                    "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    intensities = {"0": {"mean": 40.0, "median": 38.0, "std": 30.0, "min": -200.0, "max": 300.0,
                         "percentile_99_5": 180.0, "percentile_00_5": -80.0}}
    fingerprint = {"spacings": [list(spacing)] * n, "shapes_after_crop": [list(shape)] * n,
                   "foreground_intensity_properties_per_channel": intensities,
                   "median_relative_size_after_cropping": 1.0}
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"] = str(root / "raw"), str(root / "preprocessed")
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    n_proc_da = os.environ.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planner crashes with 0 (torch threads)
    try:
        ExperimentPlanner(DATASET_ID).plan_experiment()
    finally:
        if n_proc_da is not None:
            os.environ["nnUNet_n_proc_DA"] = n_proc_da
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    if configuration not in plans["configurations"]:
        raise SystemExit(f"nnU-Net planned no {configuration} for this shape: {list(plans['configurations'])}")
    # the trainer's constructor infers the loader class from the preprocessed files' ending; nothing is read
    data = preprocessed / plans["configurations"][configuration]["data_identifier"]
    data.mkdir(exist_ok=True)
    (data / "case_000.b2nd").touch()
    return preprocessed / "nnUNetPlans.json", raw / "dataset.json"


def synthetic_batch(trainer, generator):
    """A batch as nnU-Net's loader gives it: image (B, C, *patch), labels (B, 1, *patch) with a few blobs per
    case, downsampled per deep-supervision scale when the trainer uses deep supervision."""
    import torch
    cm = trainer.configuration_manager
    patch, batch = cm.patch_size, cm.batch_size
    channels = len(trainer.dataset_json["channel_names"])
    image = torch.randn(batch, channels, *patch, generator=generator)
    coarse = torch.rand(batch, 1, *[max(p // 8, 1) for p in patch], generator=generator)
    labels = (torch.nn.functional.interpolate(coarse, size=list(patch), mode="nearest") > 0.7).float()
    labels = labels * torch.randint(1, trainer.label_manager.num_segmentation_heads, (batch, 1, *[1] * len(patch)),
                                    generator=generator)
    if not trainer.enable_deep_supervision:
        return {"data": image, "target": labels}
    targets = [torch.nn.functional.interpolate(labels, size=[max(round(p * s), 1) for p, s in zip(patch, scale)],
                                               mode="nearest") for scale in trainer._get_deep_supervision_scales()]
    return {"data": image, "target": targets}


def measure_window(trainer, device: str) -> dict:
    """One sliding window as nnU-Net's predictor runs it (eval mode, inference_mode, fp16 autocast on CUDA, batch 1,
    no mirroring): the whole sampler for a diffusion model. Seconds of the second call, and the peak memory so far
    (measured before any training step, so the process's peak is the prediction's)."""
    import torch
    from torch import autocast
    trainer.set_deep_supervision_enabled(False)  # as nnU-Net's predictor builds the stock network
    network = trainer.network.eval()
    cm = trainer.configuration_manager
    patch = torch.randn(1, len(trainer.dataset_json["channel_names"]), *cm.patch_size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(device, enabled=device == "cuda"):
        network(patch)
        sync()
        tic = time.perf_counter()
        logits = network(patch)
        sync()
    seconds = time.perf_counter() - tic
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"s_per_window": seconds, "window_peak_mib": peak, "window_finite": bool(torch.isfinite(logits).all())}


def save_untrained_checkpoint(trainer_name: str, plans_file: str, dataset_json_file: str, configuration: str,
                              device: str) -> None:
    """An untrained ``trainer_name`` model saved as its checkpoint_final.pth under nnUNet_results (fold 0)."""
    trainer = build_trainer(trainer_name, plans_file, dataset_json_file, configuration, device)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))


def ensure_stage1_checkpoint(trainer_class, plans: dict, plans_file: str, dataset_json_file: str, configuration: str,
                             device: str) -> None:
    """A stage-2 trainer (``stage1_trainer``, DSM's) reads stage 1's checkpoint_final.pth from nnUNet_results when it
    is built. For time and memory an untrained stage 1 serves: saved once, by a process of its own (its memory is not
    the measured process's), into nnUNet_results, which both scripts point at a temporary folder of their own."""
    from nnunet_diffusion.trainers.common.pretrained_condition import stock_checkpoint_path
    stage1 = getattr(trainer_class, "stage1_trainer", None)
    if stage1 is None or stock_checkpoint_path(os.environ["nnUNet_results"], plans["dataset_name"],
                                               plans["plans_name"], configuration, 0, stage1).exists():
        return
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "from memory_benchmark import save_untrained_checkpoint; save_untrained_checkpoint(*sys.argv[1:])")
    subprocess.run([sys.executable, "-c", code, stage1, plans_file, dataset_json_file, configuration, device],
                   check=True, capture_output=True)


def build_trainer(trainer_name: str, plans_file: str, dataset_json_file: str, configuration: str, device: str):
    """``trainer_name`` built and initialised from a plans file as nnUNetv2_train builds it (fold 0)."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    if trainer_class is None:
        raise SystemExit(f"trainer {trainer_name} not found (is nnUNet_extTrainer set?)")
    plans, dataset_json = json.loads(Path(plans_file).read_text()), json.loads(Path(dataset_json_file).read_text())
    ensure_stage1_checkpoint(trainer_class, plans, plans_file, dataset_json_file, configuration, device)
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
    trainer = trainer_class(plans, configuration, 0, dataset_json, device=torch.device(device))
    trainer.initialize()
    return trainer


def measure_one(trainer_name: str, plans_file: str, dataset_json_file: str, configuration: str, device: str,
                iterations: int, window: bool = False) -> dict:
    """Build ``trainer_name`` as nnUNetv2_train does and time ``iterations`` train steps after one warm-up; with
    ``window``, first one prediction window (``measure_window``)."""
    import torch
    trainer = build_trainer(trainer_name, plans_file, dataset_json_file, configuration, device)
    predicted = measure_window(trainer, device) if window else {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.network.train()
    if hasattr(trainer, "condition_pretrain_fraction"):
        trainer.condition_pretrain_fraction = 0.0  # UniSegDiff: measure the DNet phase, not CFENet's pre-training
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(trainer, generator) for _ in range(2)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    trainer.train_step(batches[0])  # warm-up: cuDNN autotuning, allocator growth
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    losses = [float(trainer.train_step(batches[(i + 1) % 2])["loss"]) for i in range(iterations)]
    sync()
    seconds = (time.perf_counter() - tic) / iterations
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    cm = trainer.configuration_manager
    return {"trainer": trainer_name, "patch": list(cm.patch_size), "batch": cm.batch_size,
            "features": list(cm.network_arch_init_kwargs["features_per_stage"]), "peak_mib": peak,
            "s_per_it": seconds, "losses": losses, "finite": all(l == l and abs(l) != float("inf") for l in losses),
            **predicted}


def run_one_process(trainer: str, args, plans: Path, dataset_json: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", trainer, "--plans-file", str(plans), "--dataset-json", str(dataset_json),
           "--configuration", args.configuration, "--device", args.device, "--iterations", str(args.iterations),
           *(["--window"] if args.window else [])]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        error = "out of memory" if "out of memory" in result.stderr.lower() else "failed"
        return {"trainer": trainer, "error": error, "log": "\n".join(tail)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_table(rows: list[dict], args, command: str) -> str:
    stock = next((r for r in rows if r["trainer"] == STOCK and "error" not in r), None)
    done = [r for r in rows if "error" not in r]
    planned = done[0] if done else {"patch": "?", "batch": "?", "features": "?"}
    peak_kind = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak resident set of the process"
    lines = [f"# Peak training memory at nnU-Net's planned patch and batch ({args.device})", "",
             f"Command: `{command}`", "",
             f"Plan: nnU-Net's ExperimentPlanner for {' x '.join(map(str, args.shape))} voxels at "
             f"{' x '.join(map(str, args.spacing))} mm ({args.configuration}): patch {planned['patch']}, batch "
             f"{planned['batch']}, features {planned['features']}. Each trainer is built as nnUNetv2_train builds it "
             f"and runs its own train_step {args.iterations} times after a warm-up, on synthetic batches. "
             f"Peak: {peak_kind}. Ratios against {STOCK} in this run."
             + (" Window: one sliding window of the planned patch as nnU-Net's predictor runs it (batch 1, no "
                "mirroring, the stored sampler), timed on its second call, measured before the training steps "
                "(its peak is the process's peak up to then)." if args.window else ""), "",
             "| trainer | peak MiB | s/iteration | losses finite |" + (" s/window | window peak MiB | window finite |"
                                                                     if args.window else ""),
             "|---|---|---|---|" + ("---|---|---|" if args.window else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['trainer']} | {r['error']} | | |" + (" | | |" if args.window else ""))
            continue
        ratio = (lambda k: f" ({r[k] / stock[k]:.2f}x)" if stock else "")
        window = (f" {r['s_per_window']:.2f}{ratio('s_per_window')} | {r['window_peak_mib']:.0f}"
                  f"{ratio('window_peak_mib')} | {r['window_finite']} |" if args.window else "")
        lines.append(f"| {r['trainer']} | {r['peak_mib']:.0f}{ratio('peak_mib')} | {r['s_per_it']:.3f}"
                     f"{ratio('s_per_it')} | {r['finite']} |" + window)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--shape", type=int, nargs="+", default=[40, 512, 512], help="median voxels (z y x)")
    parser.add_argument("--spacing", type=float, nargs="+", default=[5.0, 0.8, 0.8], help="mm (z y x)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/memory_cpu.md")
    parser.add_argument("--window", action="store_true", help="also time one prediction window (the sampler)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--plans-file", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.plans_file, args.dataset_json, args.configuration, args.device,
                                     args.iterations, args.window)))
        return
    from nnunet_diffusion.cli import trainer_path
    command = "python benchmarks/memory_benchmark.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        plans, dataset_json = plan_dataset(Path(tmp), args.shape, args.spacing, args.configuration)
        # nnUNet_compile: the stock network uncompiled, as ours (compiled, its warm-up takes ~50 s on CUDA)
        env = {**os.environ, "nnUNet_extTrainer": trainer_path(), "nnUNet_results": str(Path(tmp) / "results"),
               "nnUNet_compile": os.environ.get("nnUNet_compile", "f"),
               "nnUNet_raw": os.environ["nnUNet_raw"], "nnUNet_preprocessed": os.environ["nnUNet_preprocessed"]}
        rows = []
        for trainer in args.trainers:
            rows.append(run_one_process(trainer, args, plans, dataset_json, env))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "log"}), flush=True)
            if "log" in rows[-1]:
                print(rows[-1]["log"], flush=True)
    table = write_table(rows, args, command)
    Path(args.out).write_text(table)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
