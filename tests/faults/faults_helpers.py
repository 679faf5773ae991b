"""Helpers of the fault tests: real nnUNetv2_train / nnunet-diffusion processes on the tiny example dataset of the session,
killed with SIGKILL, given truncated and foreign files, NaN losses and bad data (docs/explanation/faults.md).

Each test trains its own fold (1-4 or 'all') of the 2d configuration, so that they never share a results folder
with each other or with the end-to-end tests (fold 0)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATASET_ID, model_folder, run

TRAINER = "nnUNetTrainerDiffusion"
CONFIGURATION = "2d"
# short runs that write checkpoint_latest after every epoch (what a kill may lose at most)
FAULT_RUN = {"NNUNET_DIFFUSION_EPOCHS": "2", "NNUNET_DIFFUSION_ITERATIONS": "2", "NNUNET_DIFFUSION_VAL_ITERATIONS": "1",
             "NNUNET_DIFFUSION_SAVE_EVERY": "1", "NNUNET_DIFFUSION_FINAL_VALIDATION": "0"}


def train_command(fold, *extra, trainer=TRAINER, configuration=CONFIGURATION):
    return ["nnUNetv2_train", str(DATASET_ID), configuration, str(fold), "-tr", trainer, "-device", "cpu", *extra]


def python_command(code: str, *argv: str) -> list:
    """A Python process that runs ``code`` with sys.argv[1:] = argv (e.g. nnUNetv2_train's arguments after a
    fault has been planted with a monkeypatch)."""
    return [sys.executable, "-c", code, *argv]


def fold_folder(nnunet, fold, trainer=TRAINER, configuration=CONFIGURATION) -> Path:
    return model_folder(nnunet, trainer, configuration) / f"fold_{fold}"


def wait_for(condition, process, timeout=120.0, interval=0.01):
    """Poll ``condition()`` until true; fail if ``process`` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the process ended ({process.returncode}) before the moment to kill it:\n"
                                 f"{out[-3000:]}\n{err[-3000:]}")
        time.sleep(interval)
    process.kill()
    raise AssertionError("timed out waiting for the moment to kill the process")


def sigkill(process) -> None:
    """SIGKILL (no cleanup, no finally blocks: what the kernel's OOM killer or a pre-emption does)."""
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def start(cmd, env):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_text(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob("training_log_*.txt")))


def logged(folder: Path, message: str) -> bool:
    """Whether a line of the training logs is ``message`` (after nnU-Net's timestamp)."""
    return any(line.split(": ", 1)[-1].strip() == message for line in log_text(folder).splitlines())


@pytest.fixture(scope="session")
def trained(nnunet):
    """A finished 2d model (fold 4, 2 epochs): checkpoint_final and checkpoint_best. Trained once per session (the
    modules that import this fixture each get their own instance of it)."""
    folder = fold_folder(nnunet, 4)
    if not (folder / "checkpoint_final.pth").is_file():
        run(train_command(4), {**nnunet["env"], **FAULT_RUN})
    return folder
