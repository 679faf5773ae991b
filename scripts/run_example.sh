#!/usr/bin/env bash
# The main job (README): real example data -> plan -> train -> predict held-out -> evaluate -> Dice + PNG.
#   TRAINER (default nnUNetTrainerDiffSegRecycling), TRAIN_SECONDS (default 300), WORK (default work_dirs/example),
#   DEVICE (default: cuda when torch sees a GPU, else cpu), CONFIGURATION (default 2d)
# The set-up (5 mm, 4 classes, 2d, 16-128 features, left-right mirroring only, 300 s) is the one where the stock
# nnU-Net trainer learns on 2 CPU cores in minutes (README, 'Example data').
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
cd "$repo_root"
trainer="${TRAINER:-nnUNetTrainerDiffSegRecycling}"
seconds="${TRAIN_SECONDS:-300}"
configuration="${CONFIGURATION:-2d}"
plans=nnUNetPlans_CPU
work="$(realpath -m "${WORK:-work_dirs/example}")"
device="${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/results_$(date +%Y%m%d_%H%M%S)"  # a new folder per run: nothing earlier is overwritten
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
nnunet-diffusion check

dataset=$(ls -d "$nnUNet_raw"/Dataset501_* 2>/dev/null | head -n 1 || true)
if [ -z "$dataset" ]; then
  echo "[example] building Dataset501 from the ICBM152 template and the AAL atlas (5 mm, 24 + 6 cases)"
  dataset=$(nnunet-diffusion build-example -d 501 --spacing 5 --num-train 24 --num-test 6 | tail -n 1)
fi
name=$(basename "$dataset")
if [ ! -d "$nnUNet_preprocessed/$name/nnUNetPlans_$configuration" ]; then
  echo "[example] planning and preprocessing $configuration (nnUNetv2_plan_and_preprocess)"
  nnUNetv2_plan_and_preprocess -d 501 -c "$configuration" -np 2 --verify_dataset_integrity >/dev/null
  rm -f "$nnUNet_preprocessed/$name/$plans.json"  # re-derive below from the plans just written
fi
if [ ! -f "$nnUNet_preprocessed/$name/$plans.json" ]; then
  # nnU-Net plans for a GPU (32-320 features); on 2 CPU cores that network sees too few iterations in minutes
  echo "[example] writing $plans: nnU-Net's plans with 16-128 features (nnunet-diffusion small-plans)"
  nnunet-diffusion small-plans -d 501 --target "$plans" --base-features 16 --max-features 128
fi

# the labels are left-right symmetric but not front-back or top-bottom: mirror (augmentation and test time) only
# along the left-right axis (axis 1 of a 2d slice, 2 of a 3d volume)
mirror_axes=$([ "$configuration" = 2d ] && echo 1 || echo 2)
echo "[example] training $trainer ($configuration) on fold 0 for $seconds s on $device (a line per epoch)"
NNUNET_DIFFUSION_TIME_BUDGET="$seconds" NNUNET_DIFFUSION_ITERATIONS=25 NNUNET_DIFFUSION_VAL_ITERATIONS=3 \
NNUNET_DIFFUSION_FINAL_VALIDATION=0 NNUNET_DIFFUSION_MIRROR_AXES="$mirror_axes" nnUNet_n_proc_DA=0 PYTHONUNBUFFERED=1 \
  nnUNetv2_train 501 "$configuration" 0 -tr "$trainer" -p "$plans" -device "$device" \
  | grep --line-buffered -E "Epoch [0-9]+$|Pseudo dice|Epoch time|budget|Training done" || true
model="$nnUNet_results/$name/${trainer}__${plans}__${configuration}"
[ -f "$model/fold_0/checkpoint_final.pth" ] || { echo "[example] training failed: see $model/fold_0/training_log_*.txt" >&2; exit 1; }

echo "[example] predicting the held-out images (nnunet-diffusion predict: mirroring batched, uncertainty maps)"
predictions="$work/predictions_${trainer}_$(basename "$nnUNet_results")"
nnUNet_n_proc_DA=0 nnunet-diffusion predict -i "$dataset/imagesTs" -o "$predictions" -d 501 -c "$configuration" \
  -p "$plans" -tr "$trainer" -f 0 -device "$device" -npp 0 -nps 0 --uncertainty --disable_progress_bar >/dev/null
echo "[example] uncertainty maps (predictive entropy, mutual information): $predictions/uncertainty/"

nnUNetv2_evaluate_folder "$dataset/labelsTs" "$predictions" -djfile "$model/dataset.json" \
  -pfile "$model/plans.json" >/dev/null
echo "[example] Dice of $trainer on the $(ls "$dataset/labelsTs" | wc -l) held-out images:"
nnunet-diffusion dice "$predictions/summary.json" "$dataset/dataset.json"
figure=$(nnunet-diffusion slices-figure -i "$dataset/imagesTs" -g "$dataset/labelsTs" -p "$predictions" \
  -o "$predictions/slices.png")
echo "[example] slices of image, ground truth and prediction: $figure"
