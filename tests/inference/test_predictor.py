"""DiffusionPredictor's window path against nnU-Net's own predictor, and its uncertainty on a constructed case."""
import pytest
import torch
from torch import nn

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.inference.predictor import DiffusionPredictor
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion

C = 3


def predictors(network, mirror_axes, **ours):
    """nnU-Net's predictor and ours around the same network, mirroring on, CPU."""
    made = []
    for cls, kwargs in ((nnUNetPredictor, {}), (DiffusionPredictor, ours)):
        predictor = cls(use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False, **kwargs)
        predictor.network, predictor.allowed_mirroring_axes = network, mirror_axes
        made.append(predictor)
    return made


def diffusion_network(trainer, configuration_manager, sampler, dim=3):
    torch.manual_seed(0)
    network = trainer.build_network_architecture(None, configuration_manager(dim), 1, C, False)
    network.set_sampler(sampler, allow_untrained=True)
    return network.eval()


@pytest.mark.parametrize("max_batch", [8, 3, 1])
def test_batched_mirroring_equals_nnunets_sequential_mirroring(max_batch, configuration_manager, one_thread):
    network = diffusion_network(nnUNetTrainerDiffusion, configuration_manager, SamplerSettings("ddim", steps=4))
    stock, ours = predictors(network, (0, 1, 2), max_batch=max_batch)
    x = torch.randn(1, 1, 8, 8, 8)
    calls = []
    network.denoiser.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    expected = stock._internal_maybe_mirror_and_predict(x)
    calls.clear()
    got = ours._internal_maybe_mirror_and_predict(x)
    # all 8 copies in one sampler run (or in chunks of max_batch copies), image branch once per copy
    assert calls == [min(8, max_batch)] * (8 // min(8, max_batch)) + ([8 % max_batch] if 8 % max_batch else [])
    # another batch size rounds differently in the CPU kernels (tests/faults/test_determinism.py: up to 1.8e-3 after
    # 4 DDIM steps, in a few values); with nnU-Net's He initialisation a few values reach 1.6e-3 here
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=3e-3)
    assert (got - expected).abs().mean() < 1e-5


def test_batched_mirroring_equals_sequential_for_a_recurrent_network_with_samples(configuration_manager, one_thread):
    network = diffusion_network(nnUNetTrainerCrossTimestep, configuration_manager,
                                SamplerSettings("ddim", steps=4, num_samples=2), dim=2)
    stock, ours = predictors(network, (0, 1), max_batch=5)  # 2 samples per copy: chunks of 2 copies
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(ours._internal_maybe_mirror_and_predict(x),
                               stock._internal_maybe_mirror_and_predict(x), rtol=1e-4, atol=1e-4)


def test_plain_network_passes_through_unchanged(configuration_manager, one_thread):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(4, C, 3, padding=1)).eval()
    stock, ours = predictors(network, (0, 2))
    x = torch.randn(1, 1, 6, 7, 8)
    torch.testing.assert_close(ours._internal_maybe_mirror_and_predict(x),
                               stock._internal_maybe_mirror_and_predict(x), rtol=1e-5, atol=1e-5)


class LeftColumnsAndBrightVoxels(nn.Module):
    """Two classes. Says class 1, with certainty, where the image is bright (what every mirrored copy agrees on)
    and in the two leftmost columns of whatever window it sees (which the mirrored copy places on the right)."""

    def forward(self, x):
        left = torch.zeros_like(x[:, :1])
        left[..., :2] = 1
        foreground = ((x[:, :1] > 0) | (left > 0)).float()
        return torch.cat([10 - 20 * foreground, 20 * foreground - 10], dim=1)


def test_uncertainty_is_high_where_copies_disagree_and_low_where_they_agree(configuration_manager, one_thread):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    _, ours = predictors(LeftColumnsAndBrightVoxels(), (1,), uncertainty=True)
    ours.configuration_manager = configuration_manager(2, patch=[8, 8])
    ours.label_manager = LabelManager({"background": 0, "thing": 1}, regions_class_order=None)
    ours.use_gaussian = False
    image = -torch.ones(1, 1, 8, 8)   # one window (z=1 slice of a 2d configuration)
    image[..., 3:5, 3:5] = 1          # bright square in the middle: certain foreground for both copies
    out = ours.predict_sliding_window_return_logits(image).float()
    assert out.shape == (2 + 2, 1, 8, 8)
    entropy, mutual_information = out[2, 0], out[3, 0]
    disagree = torch.zeros(8, 8, dtype=torch.bool)
    disagree[:, :2] = disagree[:, -2:] = True   # one copy says 1, the other 0
    assert mutual_information[disagree].min() > 0.65          # log 2 = 0.693: two certain members disagree
    assert mutual_information[~disagree].max() < 1e-3         # both agree (background, or the bright square)
    assert entropy[~disagree].max() < 1e-3
    torch.testing.assert_close(entropy[disagree], mutual_information[disagree], rtol=1e-3, atol=1e-3)


def test_progress_shows_sampler_steps_and_can_be_silenced(configuration_manager, capsys, one_thread):
    network = diffusion_network(nnUNetTrainerDiffusion, configuration_manager, SamplerSettings("ddim", steps=4), dim=2)
    for allow in (True, False):
        predictor = DiffusionPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=allow)
        predictor.network, predictor.allowed_mirroring_axes = network, None
        predictor._internal_maybe_mirror_and_predict(torch.randn(1, 1, 8, 8))
        err = capsys.readouterr().err
        assert ("sampler steps" in err and "/4 " in err) if allow else err == ""


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        DiffusionPredictor(device=torch.device("cpu"), max_batch=0)


@pytest.mark.parametrize("max_batch", [8, 1])
def test_sliding_window_with_batched_windows_equals_nnunets(max_batch, configuration_manager, one_thread):
    """A 2d image of 3 x 3 windows: several windows per sampler run (max_batch 8: 2 windows x 4 copies) give
    nnU-Net's Gaussian-weighted result for a deterministic sampler."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    network = diffusion_network(nnUNetTrainerDiffusion, configuration_manager, SamplerSettings("ddim", steps=2), dim=2)
    stock, ours = predictors(network, (0, 1), max_batch=max_batch)
    for predictor in (stock, ours):
        predictor.configuration_manager = configuration_manager(2, patch=[8, 8])
        labels = {"background": 0, **{f"c{i}": i for i in range(1, C)}}
        predictor.label_manager = LabelManager(labels, regions_class_order=None)
    assert ours.windows_per_call() == max(1, max_batch // 4)
    image = torch.randn(1, 2, 16, 16)  # (C_img, z, x, y): 2 slices of 16 x 16, 8 x 8 windows at step 0.5
    torch.testing.assert_close(ours.predict_sliding_window_return_logits(image).float(),
                               stock.predict_sliding_window_return_logits(image).float(), rtol=2e-3, atol=2e-2)


def test_staged_sampler_batches_its_two_chains_not_its_twenty_samples(configuration_manager, one_thread):
    """UniSegDiff draws its 20 samples after its last network call, from 2 chain states per copy: --max_batch 8
    holds 2 windows x 2 mirrored copies x 2 chains per call (it held one copy of one window when the 20 samples
    were counted), and the batched result is nnU-Net's sequential mirroring of the same windows."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff
    torch.manual_seed(0)
    network = nnUNetTrainerUniSegDiff.build_network_architecture(
        None, ConfigurationManager(configuration_manager(2, features=(4, 8)).configuration), 1, C, False)
    network.set_sampler(SamplerSettings("staged", 10, 20, 0, "staple"), allow_untrained=True)
    network.eval()
    stock, ours = predictors(network, (1,), max_batch=8)
    assert ours.batch_per_copy() == 2 and ours.windows_per_call() == 2
    calls = []
    network.denoiser.noise_encoder.stages[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    windows = torch.randn(2, 1, 16, 16)
    expected = torch.cat([stock._internal_maybe_mirror_and_predict(w[None]) for w in windows])
    calls.clear()
    got = ours._internal_maybe_mirror_and_predict(windows)
    # 4 patches (2 windows x 2 copies) in one chunk: the first jump on 4, the middle steps and the last call on 8
    assert calls == [4] + [8] * 11
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=3e-3)
