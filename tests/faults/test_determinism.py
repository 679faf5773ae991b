"""Same model, seed, data and device: the same prediction, bit for bit on the CPU, whatever the batching."""
import numpy as np
from conftest import DATASET_ID, run
from faults_helpers import TRAINER, trained  # noqa: F401 (fixture)


def predict(nnunet, out, *extra):
    run(["nnunet-diffusion", "predict", "-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
         "-c", "2d", "-tr", TRAINER, "-f", "4", "-device", "cpu", "--save_probabilities", "-npp", "0", "-nps", "0",
         *extra], nnunet["env"])
    return {p.name: np.load(p)["probabilities"] for p in sorted(out.glob("*.npz"))}


def test_same_seed_same_prediction_bit_for_bit_whatever_the_batching(nnunet, trained, tmp_path):
    first = predict(nnunet, tmp_path / "a", "--steps", "3")
    again = predict(nnunet, tmp_path / "b", "--steps", "3")
    one_window_per_call = predict(nnunet, tmp_path / "c", "--steps", "3", "--max_batch", "1")
    other_seed = predict(nnunet, tmp_path / "d", "--steps", "3", "--seed", "1")
    assert first.keys() == again.keys() == one_window_per_call.keys() == other_seed.keys() and len(first) == 2
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])
        np.testing.assert_array_equal(one_window_per_call[name], first[name])
        assert np.abs(other_seed[name] - first[name]).max() > 1e-6  # the seed does decide the noise
