#!/usr/bin/env bash
# GPU checks and GPU benchmark rows, run on a lent CUDA machine (README, 'GPU checks'). That machine has torch
# but neither nnU-Net nor SimpleITK and no network: .dev/devsite.tar.xz holds them for its Python (3.12),
# .dev/raw the example dataset (Dataset503, built here with `nnunet-diffusion build-example`).
#   1. peak training memory at nnU-Net's plan for a lesion CT (benchmarks/memory_benchmark.py --device cuda)
#   2. the equal-budget benchmark in 3d_fullres with nnU-Net's GPU plans (benchmarks/run_benchmark.py)
#   3. 2d on CUDA: train with the final validation (the real sampler in nnU-Net's predictor), resume with --c,
#      predict with nnunet-diffusion predict (mirroring, uncertainty maps)
# Results go to $OUT (the device tool brings them back). Usage there: bash benchmarks/device_check.sh [steps]
set -uo pipefail
OUT="${OUT:-/tmp/device_out}"; mkdir -p "$OUT"
steps="${1:-123}"
trainers="${TRAINERS:-nnUNetTrainerDiffusion nnUNetTrainerDiffSegRecycling nnUNetTrainerCrossTimestep nnUNetTrainerUniSegDiff}"
tar xJf .dev/devsite.tar.xz -C /tmp
sed -i "1s|.*|#!$(command -v python3)|" /tmp/devsite/bin/*
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec %s -c "import sys; from nnunet_diffusion.cli import main; sys.exit(main())" "$@"\n' \
  "$(command -v python3)" > /tmp/bin/nnunet-diffusion && chmod +x /tmp/bin/nnunet-diffusion
export PYTHONPATH="/tmp/devsite:$PWD" PATH="/tmp/bin:/tmp/devsite/bin:$PATH" PYTHONUNBUFFERED=1
export nnUNet_extTrainer="$(nnunet-diffusion trainer-path)" nnUNet_def_n_proc=8 nnUNet_n_proc_DA=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
work=/tmp/bench; mkdir -p $work/raw && cp -r .dev/raw/* $work/raw/
if [[ $steps == *1* ]]; then
  echo "== 1. memory at the planned patch and batch"
  python3 benchmarks/memory_benchmark.py --device cuda --iterations "${ITERATIONS:-5}" --out "$OUT/memory_gpu.md" \
    --trainers nnUNetTrainer $trainers 2>&1 | grep -v "^{'data_identifier\|^Plans were\|^$" | tail -n 40
fi
if [[ $steps == *2* ]]; then
  echo "== 2. equal-budget benchmark, 3d_fullres, GPU plans"
  python3 benchmarks/run_benchmark.py --device cuda --configuration 3d_fullres --plans nnUNetPlans \
    --budget "${BUDGET:-20}" --mirror-axes 2 --work $work --out "$OUT/results_gpu.md" \
    --trainers nnUNetTrainerBudget nnUNetTrainerBudgetAdam1en3 $trainers 2>&1 | grep -v '^{' | tail -n 40
fi
if [[ $steps == *3* ]]; then
  echo "== 3. 2d on CUDA: final validation, --c, nnunet-diffusion predict"
  export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results_2d
  env -u nnUNet_n_proc_DA nnUNetv2_plan_and_preprocess -d 503 -c 2d -np 8 >/dev/null 2>&1  # planning fails with 0
  for tr in ${CHECK_2D:-nnUNetTrainerUniSegDiff}; do
    NNUNET_DIFFUSION_TIME_BUDGET=10 NNUNET_DIFFUSION_VAL_ITERATIONS=2 NNUNET_DIFFUSION_MIRROR_AXES=1 \
      nnUNetv2_train 503 2d 0 -tr $tr -device cuda 2>&1 | grep -E "Epoch [0-9]+$|budget|sampler|Mean Validation|Error|error" | tail -n 8
    NNUNET_DIFFUSION_TIME_BUDGET=10 nnUNetv2_train 503 2d 0 -tr $tr -device cuda --c 2>&1 | tail -n 3
    nnunet-diffusion predict -i $work/raw/Dataset503_BrainAtlasBench/imagesTs -o $work/pred_$tr -d 503 -c 2d \
      -tr $tr -f 0 -device cuda --uncertainty --disable_progress_bar 2>&1 | tail -n 3
    nnUNetv2_evaluate_folder $work/raw/Dataset503_BrainAtlasBench/labelsTs $work/pred_$tr \
      -djfile $work/raw/Dataset503_BrainAtlasBench/dataset.json -pfile $work/preprocessed/Dataset503_BrainAtlasBench/nnUNetPlans.json >/dev/null 2>&1
    nnunet-diffusion dice $work/pred_$tr/summary.json $work/raw/Dataset503_BrainAtlasBench/dataset.json
    ls $work/pred_$tr/uncertainty | head -n 2
  done
fi
echo "== done"
