# Sourced by run_example.sh and run_tests.sh: make (or reuse) the virtual environment and install into it.
# torch first, from the versions this machine kind carries (nnU-Net's torchvision needs exactly this pair),
# then the package itself. Set NNUNET_DIFFUSION_VENV to use another environment folder.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNUNET_DIFFUSION_VENV:-$repo_root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
echo "[setup] installing nnunet-diffusion (editable) with ${NNUNET_DIFFUSION_EXTRAS:-no extras}"
python -m pip install -q -e "$repo_root${NNUNET_DIFFUSION_EXTRAS:+[$NNUNET_DIFFUSION_EXTRAS]}"
export nnUNet_extTrainer="$(nnunet-diffusion trainer-path)"
