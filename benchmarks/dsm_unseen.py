"""DSM on the example data with one structure held out of training as the 'unseen' class.

1. Derives a dataset from the example one (``--source-id``): the held-out label (``--unseen``, default the
   cerebellum) becomes background in every training and test label map, and dataset.json names ``--tumour`` (default
   the temporal cortex) as the class DSM's stage 2 learns with its tumour queries (``dsm_tumour_labels``).
2. Runs ``run_benchmark.py`` on it (equal training budget, the stock trainer in the same run; stage 2 starts from
   the stage-1 model of the same run, so its budget comes on top of stage 1's): Dice of the trained classes.
3. Predicts the test cases of every text-aligned DSM model with ``nnunet-diffusion predict --prompts <unseen>``
   and scores its anomaly map and prompt map against the held-out structure of the original labels: AUROC and
   FPR95 over all voxels of the test images, and the Dice of the prompt map thresholded at 0.5.

    python benchmarks/dsm_unseen.py --work /work/bench --budget 240 --out benchmarks/results_cpu_dsm.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmark  # noqa: E402

from nnunet_diffusion.analysis.ood_metrics import auroc, fpr_at_tpr  # noqa: E402
from nnunet_diffusion.inference.dsm_predictor import map_name  # noqa: E402

DEFAULT_TRAINERS = ["nnUNetTrainerBudget", "nnUNetTrainerBudgetAdam1en3", "nnUNetTrainerDSM", "nnUNetTrainerDSMStage2"]


def derive_dataset(source: Path, target: Path, unseen: str, tumour: str) -> None:
    """``source`` with ``unseen`` relabelled to background (labels renumbered consecutively) and ``tumour`` named as
    stage 2's class. The original test labels stay in ``source`` for the unseen structure's evaluation."""
    dataset = json.loads((source / "dataset.json").read_text())
    labels = dataset["labels"]
    if unseen not in labels or tumour not in labels:
        raise SystemExit(f"--unseen {unseen} / --tumour {tumour} must be labels of {source} ({list(labels)})")
    kept = [name for name in sorted(labels, key=labels.get) if name != unseen]
    new_value = {labels[name]: i for i, name in enumerate(kept)}
    lookup = np.array([new_value.get(v, 0) for v in range(max(labels.values()) + 1)], dtype=np.uint8)
    for folder in ("imagesTr", "imagesTs"):
        shutil.copytree(source / folder, target / folder)
    for folder in ("labelsTr", "labelsTs"):
        (target / folder).mkdir(parents=True)
        for path in sorted((source / folder).glob("*.nii.gz")):
            image = sitk.ReadImage(str(path))
            relabelled = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(image)])
            relabelled.CopyInformation(image)
            sitk.WriteImage(relabelled, str(target / folder / path.name), True)
    dataset["labels"] = {name: i for i, name in enumerate(kept)}
    dataset["label_descriptions"] = {k: v for k, v in dataset.get("label_descriptions", {}).items() if k != unseen}
    dataset["dsm_tumour_labels"] = [tumour]
    dataset["description"] = f"{dataset.get('description', '')} Derived: '{unseen}' held out (background)."
    (target / "dataset.json").write_text(json.dumps(dataset, indent=1))


def score_unseen(prediction: Path, source: Path, unseen_value: int, prompt: str) -> dict:
    """AUROC / FPR95 of the anomaly and prompt maps for the held-out structure, pooled over the test cases' voxels."""
    anomaly, prompted, positive = [], [], []
    for label_file in sorted((source / "labelsTs").glob("*.nii.gz")):
        case = label_file.name[:-len(".nii.gz")]
        positive.append(sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))).ravel() == unseen_value)
        anomaly.append(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction / "dsm" / f"{case}_anomaly.nii.gz"))).ravel())
        prompted.append(sitk.GetArrayFromImage(sitk.ReadImage(
            str(prediction / "dsm" / f"{case}_{map_name(prompt)}.nii.gz"))).ravel())
    positive, anomaly, prompted = (np.concatenate(a) for a in (positive, anomaly, prompted))
    found = prompted > 0.5
    return {"anomaly_auroc": auroc(anomaly, positive), "anomaly_fpr95": fpr_at_tpr(anomaly, positive),
            "prompt_auroc": auroc(prompted, positive), "prompt_fpr95": fpr_at_tpr(prompted, positive),
            "prompt_dice": float(2 * (found & positive).sum() / max(found.sum() + positive.sum(), 1)),
            "unseen_fraction": float(positive.mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--budget", type=float, default=240)
    parser.add_argument("--out", default="benchmarks/results_cpu_dsm.md")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--source-id", type=int, default=503)
    parser.add_argument("--dataset-id", type=int, default=504)
    parser.add_argument("--unseen", default="cerebellum")
    parser.add_argument("--tumour", default="temporal_cortex")
    args = parser.parse_args(argv)
    command = "python benchmarks/dsm_unseen.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    work = Path(args.work).resolve()
    source = next((work / "raw").glob(f"Dataset{args.source_id:03d}_*"))
    target = work / "raw" / f"Dataset{args.dataset_id:03d}_BrainAtlasUnseen"
    if not target.exists():
        derive_dataset(source, target, args.unseen, args.tumour)
    before = set(work.glob("results_*"))
    run_benchmark.main(["--work", str(work), "--budget", str(args.budget), "--dataset-id", str(args.dataset_id),
                        "--out", args.out, "--predict-with", "nnunet-diffusion", "--trainers", *args.trainers])
    results = max(set(work.glob("results_*")) - before)
    env = {**run_benchmark.os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(results), "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0",
           "nnUNet_extTrainer": run_benchmark.trainer_path(),
           "PATH": str(Path(sys.executable).parent) + run_benchmark.os.pathsep + run_benchmark.os.environ["PATH"]}
    unseen_value = json.loads((source / "dataset.json").read_text())["labels"][args.unseen]
    rows = []
    for trainer in [t for t in args.trainers if "DSM" in t and "noText" not in t]:
        out = work / "predictions" / f"{results.name}_{trainer}_prompts"
        subprocess.run(["nnunet-diffusion", "predict", "-i", str(target / "imagesTs"), "-o", str(out), "-d",
                        str(args.dataset_id), "-c", "2d", "-tr", trainer, "-p", "nnUNetPlans_CPU", "-f", "0",
                        "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta", "--disable_progress_bar",
                        "--prompts", args.unseen.replace("_", " ")], env=env, check=True)
        rows.append({"trainer": trainer, **score_unseen(out, source, unseen_value, args.unseen.replace("_", " "))})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["", f"## The unseen structure ('{args.unseen}', held out of training)", "",
             f"Command: `{command}`", "",
             f"Every test voxel of the {len(list((source / 'labelsTs').glob('*.nii.gz')))} test cases pooled "
             f"({rows[0]['unseen_fraction']:.1%} of them belong to the held-out structure). Anomaly map: eq. 14's "
             f"min-max normalised negative maximum of the organ masks (the background query left out; stage 2: the "
             f"kMMM organ queries, before the tumour queries mix in; stage 2 trained at a tenth of stage 1's "
             f"learning rate); prompt map: the anomaly map times the sigmoid "
             f"mask of the query most similar to the prompt '{args.unseen.replace('_', ' ')}' (eq. 20). Stage 2's "
             f"class '{args.tumour}' was learned by its tumour queries." if rows else "", "",
             "| trainer | anomaly AUROC | anomaly FPR95 | prompt AUROC | prompt FPR95 | prompt Dice (> 0.5) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['trainer']} | {r['anomaly_auroc']:.3f} | {r['anomaly_fpr95']:.3f} | {r['prompt_auroc']:.3f} | "
              f"{r['prompt_fpr95']:.3f} | {r['prompt_dice']:.3f} |" for r in rows]
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    json_file = Path(args.out).with_suffix(".json")
    stored = json.loads(json_file.read_text()) if json_file.exists() else {}
    json_file.write_text(json.dumps({**stored, "unseen": {"command": command, "rows": rows}}, indent=1))


if __name__ == "__main__":
    main()
