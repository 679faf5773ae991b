#!/usr/bin/env bash
# The main job (README): real example data -> plan -> train briefly on CPU -> predict held-out -> evaluate.
#   TRAINER (default nnUNetTrainerDiffSegRecycling), TRAIN_SECONDS (default 600), WORK (default work_dirs/example)
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
cd "$repo_root"
trainer="${TRAINER:-nnUNetTrainerDiffSegRecycling}"
work="$(realpath -m "${WORK:-work_dirs/example}")"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/results_$(date +%Y%m%d_%H%M%S)"  # a new folder per run: nothing earlier is overwritten
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
nnunet-diffusion check

dataset=$(ls -d "$nnUNet_raw"/Dataset501_* 2>/dev/null | head -n 1 || true)
if [ -z "$dataset" ]; then
  echo "[example] building Dataset501 from the ICBM152 template and the AAL atlas (3 mm, 24 + 6 cases)"
  dataset=$(nnunet-diffusion build-example -d 501 --spacing 3 --num-train 24 --num-test 6 | tail -n 1)
fi
name=$(basename "$dataset")
if [ ! -f "$nnUNet_preprocessed/$name/nnUNetPlans.json" ]; then
  echo "[example] planning and preprocessing"
  nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres -np 2 --verify_dataset_integrity
fi

echo "[example] training $trainer on fold 0 for ${TRAIN_SECONDS:-600} s on the CPU"
NNUNET_DIFFUSION_TIME_BUDGET="${TRAIN_SECONDS:-600}" NNUNET_DIFFUSION_ITERATIONS=25 NNUNET_DIFFUSION_VAL_ITERATIONS=5 \
NNUNET_DIFFUSION_FINAL_VALIDATION=0 nnUNet_n_proc_DA=0 \
  nnUNetv2_train 501 3d_fullres 0 -tr "$trainer" -device cpu

echo "[example] predicting the held-out images"
nnUNet_n_proc_DA=0 nnUNetv2_predict -i "$dataset/imagesTs" -o "$work/predictions_$trainer" -d 501 -c 3d_fullres \
  -tr "$trainer" -f 0 -device cpu -npp 0 -nps 0 --disable_tta

model="$nnUNet_results/$name/${trainer}__nnUNetPlans__3d_fullres"
nnUNetv2_evaluate_folder "$dataset/labelsTs" "$work/predictions_$trainer" -djfile "$model/dataset.json" \
  -pfile "$model/plans.json" >/dev/null
nnunet-diffusion dice "$work/predictions_$trainer/summary.json" "$dataset/dataset.json"
