"""SIGKILL at a random moment (in an epoch, in a checkpoint write, in the final validation), then --c: the run
ends where an uninterrupted one does, and a kill never leaves a truncated checkpoint under its final name."""
import json
import random
import time

import pytest
import torch
from faults_helpers import (FAULT_RUN, fold_folder, log_text, logged, python_command, sigkill, start,
                            train_command, wait_for)
from conftest import run

from nnunet_diffusion.trainers.common.fault_safety import CheckpointError, read_checkpoint

EPOCHS = 3
LONGER_RUN = {**FAULT_RUN, "NNUNET_DIFFUSION_EPOCHS": str(EPOCHS), "NNUNET_DIFFUSION_ITERATIONS": "6"}


def finished_state(folder):
    """What an uninterrupted run and a resumed one must agree on."""
    checkpoint = read_checkpoint(str(folder / "checkpoint_final.pth"))
    plans = checkpoint["init_args"]["plans"]["configurations"]["2d"]["diffusion"]
    logging = checkpoint["logging"]
    return {"epoch": checkpoint["current_epoch"], "settings": plans,
            "stored plans.json": json.loads((folder.parent / "plans.json").read_text())["configurations"]["2d"]["diffusion"],
            "log entries per key": {key: len(values) for key, values in logging.items()}}


@pytest.fixture(scope="module")
def uninterrupted(nnunet):
    run(train_command(1), {**nnunet["env"], **LONGER_RUN})
    return finished_state(fold_folder(nnunet, 1))


def test_sigkill_during_an_epoch_then_resume_reaches_the_uninterrupted_state(nnunet, uninterrupted):
    env, folder = {**nnunet["env"], **LONGER_RUN}, fold_folder(nnunet, 2)
    process = start(train_command(2), env)
    # kill somewhere inside epoch 1 or 2, after checkpoint_latest of an earlier epoch was written
    wait_for(lambda: (folder / "checkpoint_latest.pth").is_file() and logged(folder, "Epoch 1"), process)
    time.sleep(random.uniform(0, 0.5))
    sigkill(process)
    assert not (folder / "checkpoint_final.pth").exists()
    resumed_from = read_checkpoint(str(folder / "checkpoint_latest.pth"))["current_epoch"]
    assert 1 <= resumed_from < EPOCHS

    result = run(train_command(2, "--c"), env)
    assert finished_state(folder) == uninterrupted, result.stdout[-2000:]
    assert uninterrupted["epoch"] == EPOCHS
    assert all(n == EPOCHS for n in uninterrupted["log entries per key"].values())  # none duplicated or lost
    assert not (folder / "checkpoint_latest.pth").exists()  # nnU-Net removes it when training ends


SLOW_CHECKPOINT_WRITE = """
import io, sys, time, torch
from nnunetv2.run.run_training import run_training_entry
real_save, writes = torch.save, []

def slow_save(obj, f, *args, **kwargs):
    # the second write of checkpoint_latest is slow (in 40 flushed pieces), so it can be killed half-way
    if isinstance(f, str) and "checkpoint_latest" in f:
        writes.append(f)
        if len(writes) == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data, step = buffer.getvalue(), len(buffer.getvalue()) // 40 + 1
            with open(f, "wb") as out:
                for i in range(0, len(data), step):
                    out.write(data[i:i + step]); out.flush(); time.sleep(0.1)
            return
    return real_save(obj, f, *args, **kwargs)

torch.save = slow_save
sys.argv = ["nnUNetv2_train", *sys.argv[1:]]
run_training_entry()
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint_and_resumes(nnunet, uninterrupted):
    env, folder = {**nnunet["env"], **LONGER_RUN}, fold_folder(nnunet, 3)
    partial = folder / ".checkpoint_latest.pth.partial"
    process = start(python_command(SLOW_CHECKPOINT_WRITE, *train_command(3)[1:]), env)
    # the second write: the first was renamed into place already
    wait_for(lambda: (folder / "checkpoint_latest.pth").is_file() and partial.is_file() and partial.stat().st_size > 0,
             process)
    sigkill(process)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(str(partial))  # the kill landed in the middle of the write ...
    checkpoint = read_checkpoint(str(folder / "checkpoint_latest.pth"))  # ... and the previous one is whole
    assert checkpoint["current_epoch"] == 1
    assert all(torch.isfinite(w).all() for w in checkpoint["network_weights"].values() if w.is_floating_point())

    run(train_command(3, "--c"), env)
    assert finished_state(folder) == uninterrupted


def test_sigkill_during_the_final_validation_then_resume_validates_again(nnunet):
    # many sampler steps make the final validation long enough to be killed in
    env = {**nnunet["env"], **FAULT_RUN, "NNUNET_DIFFUSION_EPOCHS": "1", "NNUNET_DIFFUSION_FINAL_VALIDATION": "1",
           "NNUNET_DIFFUSION_STEPS": "334"}
    folder = fold_folder(nnunet, "all")
    process = start(train_command("all"), env)
    wait_for(lambda: (folder / "validation").is_dir(), process)
    sigkill(process)
    assert not (folder / "validation" / "summary.json").exists()
    final = (folder / "checkpoint_final.pth").read_bytes()

    result = run(train_command("all", "--c"), {**env, "NNUNET_DIFFUSION_STEPS": "2"})
    assert json.loads((folder / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0
    assert "Final validation sampler: ddim, 2 steps" in log_text(folder), result.stdout[-2000:]
    assert read_checkpoint(str(folder / "checkpoint_final.pth"))["current_epoch"] == 1  # no epoch trained again

    # and a new training in that folder, without --c, is refused rather than overwriting the model
    refused = run(train_command("all"), env, check=False)
    assert refused.returncode != 0
    assert "already holds checkpoint_final.pth" in refused.stderr and "--c" in refused.stderr
    assert (folder / "checkpoint_final.pth").read_bytes() == final
