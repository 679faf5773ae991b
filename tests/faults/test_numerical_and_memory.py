"""A non-finite loss stops training within a few iterations and keeps the last finite checkpoint; running out of
memory stops training with what to change, and splits a prediction's batch instead of failing."""
import pytest
import torch
from conftest import run
from faults_helpers import FAULT_RUN, fold_folder, python_command, train_command

from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.inference.predictor import DiffusionPredictor
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.common.fault_safety import read_checkpoint

NAN_AFTER_EPOCH_0 = """
import sys
from nnunetv2.run.run_training import run_training_entry
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
real_pass, calls = nnUNetTrainerDiffusionBase.training_loss, []

def nan_pass(self, batch):
    loss, result, target = real_pass(self, batch)
    if not self.network.training:  # per-epoch validation: as it was
        return loss, result, target
    calls.append(1)
    return (loss * float("nan") if len(calls) > 4 else loss), result, target  # epoch 0 (4 iterations) is finite

nnUNetTrainerDiffusionBase.training_loss = nan_pass
sys.argv = ["nnUNetv2_train", *sys.argv[1:]]
run_training_entry()
"""


def test_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(nnunet):
    # 3d_fullres folds 2 and 3: the end-to-end tests use 0 and 1
    env = {**nnunet["env"], **FAULT_RUN, "NNUNET_DIFFUSION_EPOCHS": "5", "NNUNET_DIFFUSION_ITERATIONS": "4"}
    folder = fold_folder(nnunet, 2, configuration="3d_fullres")
    result = run(python_command(NAN_AFTER_EPOCH_0, *train_command(2, configuration="3d_fullres")[1:]), env,
                 check=False)
    assert result.returncode != 0
    assert "the training loss was not finite (NaN or inf) in 3 consecutive iterations (epoch 1)" in result.stderr
    assert "Try a lower learning rate, or float32" in result.stderr
    checkpoint = read_checkpoint(str(folder / "checkpoint_latest.pth"))
    assert checkpoint["current_epoch"] == 1  # written after epoch 0, never overwritten by the NaN epoch
    assert all(torch.isfinite(w).all() for w in checkpoint["network_weights"].values() if w.is_floating_point())
    assert not (folder / "checkpoint_final.pth").exists()


OUT_OF_MEMORY_AT_FIRST_STEP = """
import sys, torch
from nnunetv2.run.run_training import run_training_entry
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase

def out_of_memory(self, batch):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

nnUNetTrainerDiffusionBase.train_step = out_of_memory
sys.argv = ["nnUNetv2_train", *sys.argv[1:]]
run_training_entry()
"""


def test_out_of_memory_in_training_says_what_to_change(nnunet):
    folder = fold_folder(nnunet, 3, configuration="3d_fullres")
    result = run(python_command(OUT_OF_MEMORY_AT_FIRST_STEP, *train_command(3, configuration="3d_fullres")[1:]),
                 {**nnunet["env"], **FAULT_RUN}, check=False)
    assert result.returncode != 0
    assert "nnUNetTrainerDiffusion ran out of CPU memory in training (epoch 0; patch [" in result.stderr
    assert "Lower 'batch_size' (then 'patch_size'" in result.stderr and "-gpu_memory_target" in result.stderr
    assert not list(folder.glob("checkpoint_*.pth"))


class OutOfMemoryAbove:
    """Wraps member_probabilities: raises OutOfMemoryError for more than ``limit`` windows/copies per call."""

    def __init__(self, segmenter, limit):
        self.real, self.limit, self.calls = segmenter.member_probabilities, limit, []

    def __call__(self, part, copies, on_step=None):
        self.calls.append(part.shape[0])
        if part.shape[0] > self.limit:
            raise torch.OutOfMemoryError("out of memory")
        return self.real(part, copies=copies, on_step=on_step)


def test_prediction_out_of_memory_splits_its_batch_and_gives_the_same_result_up_to_rounding(configuration_manager, one_thread,
                                                                             capsys):
    torch.manual_seed(0)
    network = nnUNetTrainerDiffusion.build_network_architecture(None, configuration_manager(3), 1, 3, False).eval()
    network.set_sampler(SamplerSettings("ddim", steps=2), allow_untrained=True)
    x = torch.randn(1, 1, 8, 8, 8)
    predictors = []
    for limit in (None, 3):
        predictor = DiffusionPredictor(use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False, max_batch=8)
        predictor.network, predictor.allowed_mirroring_axes = network, (0, 1, 2)
        predictors.append(predictor)
    expected = predictors[0]._internal_maybe_mirror_and_predict(x)
    network.member_probabilities = limited = OutOfMemoryAbove(network, 3)
    got = predictors[1]._internal_maybe_mirror_and_predict(x)
    # every member keeps its noise; only the kernels' rounding for another batch size differs
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert limited.calls == [8, 4, 2, 2, 2, 2]  # 8 copies: halved until they fit
    assert predictors[1].max_batch == 2  # and the rest of the run asks for no more
    assert "Out of memory with 8 windows/copies per network call: splitting" in capsys.readouterr().out
    network.member_probabilities = OutOfMemoryAbove(network, 0)
    with pytest.raises(MemoryError, match=r"One window of \[8, 8, 8\] voxels with 1 sample\(s\) does not fit.*"
                                          r"fewer --samples"):
        predictors[1]._internal_maybe_mirror_and_predict(x)
