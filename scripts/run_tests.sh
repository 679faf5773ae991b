#!/usr/bin/env bash
# The test command (README): installs what it needs, then runs the whole suite on the CPU.
set -euo pipefail
NNUNET_DIFFUSION_EXTRAS=test . "$(dirname "$0")/setup_env.sh"
cd "$repo_root"
export nnUNet_def_n_proc=1
exec python -m pytest -q "$@"
