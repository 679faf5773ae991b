#!/usr/bin/env bash
# The test command (README): installs what it needs, then runs the whole suite on the CPU.
# Two pytest workers (pytest-xdist, the slow tests first: tests/conftest.py SLOW_FIRST; the tests that share a trained
# model on one worker: SHARED_MODELS, --dist loadgroup; NNUNET_DIFFUSION_TEST_WORKERS changes their number, 0 runs in
# this process): most of the suite's time is nnU-Net processes and small single-threaded tensors, which two workers
# on two cores overlap. Each worker (and every nnU-Net process a test
# starts) uses one torch thread, so two workers do not oversubscribe.
set -euo pipefail
NNUNET_DIFFUSION_EXTRAS=test . "$(dirname "$0")/setup_env.sh"
cd "$repo_root"
export nnUNet_def_n_proc=1
workers="${NNUNET_DIFFUSION_TEST_WORKERS:-2}"
if [ "$workers" != "0" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  exec python -m pytest -q -n "$workers" --dist loadgroup "$@"
fi
exec python -m pytest -q "$@"
