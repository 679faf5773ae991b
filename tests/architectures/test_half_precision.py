"""Every trainer trains and samples under float16 and bfloat16 autocast, finite and close to float32.

nnU-Net trains (and predicts) on CUDA under autocast; CPU autocast casts the same layers (convolutions, linear
layers, matmuls) to the lower precision, so these tests run here. float16's largest value is 65504: a sum over a
patch of more than 65504 voxels (e.g. an unnormalised FFT's DC coefficient) overflows to inf and then NaN, so
the large-patch tests use more voxels than that. Trainers are discovered from nnU-Net's entry point
(``nnunet_ext/nnunet_diffusion_trainers.py``): a trainer added there is tested here without editing this file.
"""
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
from conftest import diffusion_trainers
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_diffusion.architectures.cross_timestep.fft_tlstm import FFTTLSTM
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling
from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg
from nnunet_diffusion.trainers.textdiffseg.variants import nnUNetTrainerTextDiffSeg_recycled
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3  # classes incl. background
HALF = (torch.float16, torch.bfloat16)
# Upper bounds of the differences to float32 (same weights, same seed). float16 keeps 11 significant bits
# (rounding 5e-4), bfloat16 8 (4e-3); a few layers accumulate a few roundings. output: relative L2 error of the
# training pass's denoiser output; loss: relative error; grad: relative L2 error of all gradients (no loss
# scaling here: small gradients lose bits); probabilities: mean absolute difference of the sampler's class
# probabilities. The maximum is not bounded: the first step from pure noise computes x0 = (x - sqrt(1 - abar) eps)
# / sqrt(abar) with 1/sqrt(abar) ~ 157 at t = 999, so a voxel near the [-1, 1] clip can flip.
TOLERANCES = {torch.float16: dict(output=5e-3, loss=1e-3, grad=5e-2, probabilities=1e-3),
              torch.bfloat16: dict(output=3e-2, loss=1e-2, grad=1e-1, probabilities=5e-3)}






def build(trainer_cls, configuration_manager, dim: int, patch=None, features=(4, 8)):
    """patch: the planned patch (UniSegDiff places its attention by it; the others ignore it)."""
    torch.manual_seed(0)
    net = trainer_cls.build_network_architecture(None, configuration_manager(dim, features=features, patch=patch), 1,
                                                 C, False)
    with torch.no_grad():  # zero-initialised output layers (MONAI's DiffusionModelUNet) would make every output 0
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    try:
        net.set_sampler(SamplerSettings(kind="ddim", steps=2))
    except ValueError:
        pass  # a recurrent model samples only the chain it was trained on (its default, 10 steps)
    return net


def mostly_background(shape):
    """(1, 1, *shape) labels: background with a block of class 1 and a smaller one of class 2, so the background
    channel of x0 is +1 almost everywhere (its sum over the patch ~ the voxel count, as in real data)."""
    labels = torch.zeros((1, 1, *shape), dtype=torch.long)
    labels[(0, 0, *[slice(s // 4, s // 2) for s in shape])] = 1
    labels[(0, 0, *[slice(s // 2, s // 2 + max(1, s // 8)) for s in shape])] = 2
    return labels


def native_bfloat16_kernels(dtype: torch.dtype):
    """oneDNN off for a bfloat16 run on the CPU. Why: on CPUs with AVX512-BF16 (this machine's AMD EPYC, torch
    2.14.1), oneDNN's bfloat16 weight gradient of a 3x3x3 convolution on a 2 x 2 x 2 map returned values of 1e33 to
    1e38 in some entries (uninitialised memory: it depends on what the allocator reuses) while its forward and its
    input gradient were right; PyTorch's own kernels give the right gradient. nnU-Net autocasts only on CUDA, so no
    training or prediction runs these CPU kernels; the test checks our numerics, not oneDNN's."""
    return torch.backends.mkldnn.flags(enabled=dtype != torch.bfloat16)


def train_and_sample(net, image: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    """One training pass with nnU-Net's loss and backward, and one sampler run, under autocast(dtype) (float32: no
    autocast), with the same seed. image (1, 1, *S), labels (1, 1, *S).
    Returns (denoiser output of the training pass (B', C, *S) float32, loss (), flat gradient (P,),
    class probabilities of the sampler (1, C, *S))."""
    loss_owner = SimpleNamespace(loss=DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
        ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss))
    net.zero_grad(set_to_none=True)
    with native_bfloat16_kernels(dtype):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            torch.manual_seed(1)
            result = net.train()(image, labels_to_x0(labels, C))
            # the trainers' own loss (MSE to the noise or Dice + CE, plus APDS), as in train_step
            loss = nnUNetTrainerDiffusionBase.diffusion_loss(loss_owner, result, labels)
        loss.backward()
    grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), \
            native_bfloat16_kernels(dtype):
        probabilities = net.eval()(image).exp()
    return result.output.float(), loss.detach(), grad, probabilities


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_close_to_float32(net, image, labels, dtypes, probabilities_scale: float = 1.0):
    """probabilities_scale widens the probabilities' bound for samplers that amplify the denoiser's rounding."""
    reference = train_and_sample(net, image, labels, torch.float32)
    for dtype in dtypes:
        output, loss, grad, probabilities = train_and_sample(net, image, labels, dtype)
        tol = TOLERANCES[dtype]
        for name, value in [("output", output), ("loss", loss), ("grad", grad), ("probabilities", probabilities)]:
            assert torch.isfinite(value).all(), f"{dtype}: non-finite {name}"
        assert relative_error(output, reference[0]) < tol["output"], dtype
        assert abs(loss.item() - reference[1].item()) < tol["loss"] * abs(reference[1].item()), dtype
        assert relative_error(grad, reference[2]) < tol["grad"], dtype
        assert (probabilities - reference[3]).abs().mean() < tol["probabilities"] * probabilities_scale, dtype


@pytest.mark.parametrize("trainer_cls", diffusion_trainers(), ids=lambda cls: cls.__name__)
def test_every_trainer_trains_and_samples_in_half_precision(trainer_cls, configuration_manager):
    """Small 3D patch (fast): every trainer and every block, both half types."""
    net = build(trainer_cls, configuration_manager, dim=3)
    # UniSegDiff's staged sampler converts the eps head's output to x0 at t = 599 .. 299 on its noise branch, ten
    # times: 1 / sqrt(abar_599) ~ 6 amplifies each step's rounding (measured float16: 1.4e-3)
    scale = 3.0 if trainer_cls.staged_sampler() else 1.0
    if net.sampler.fusion == "staple":
        # STAPLE fuses label maps: one rounding that flips a sample's voxel moves the consensus by a whole vote
        # (the X_299 samples of a branch nearly agree, so a flip gives 0.5), not by a rounding. The closeness bound
        # is checked on mean fusion here; STAPLE under float16 on a large patch in the test below
        net.set_sampler(replace(net.sampler, fusion="mean"))
    if hasattr(net.denoiser, "encode_labels"):
        # TextDiffSeg's decoded latent: with nnU-Net's He initialisation its image encoder's activations have about
        # 1.7x PyTorch's default scale, and the decoder turns the latent's roundings into probabilities
        # (measured float16: 1.5e-3 for _reduceLabels)
        scale = 2.0
    check_close_to_float32(net, torch.randn(1, 1, 8, 8, 8), mostly_background((8, 8, 8)), HALF, scale)


def denoise_clean_mask(net, image: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The denoiser's output (1, C, *S) for x_t = the mask itself at the cleanest timestep, under autocast(dtype).

    The worst case for sums over a patch: the background channel of a nearly noise-free mask sums to ~N. Training
    reaches it whenever it draws a small t, but a random draw may not, so it is run directly."""
    t = net.model_timesteps(torch.zeros(1, dtype=torch.long))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        clean = labels_to_x0(labels, C)
        if hasattr(net.denoiser, "encode_labels"):  # latent diffusion: the clean state is the labels' latent
            clean = net.denoiser.encode_labels((clean + 1) / 2)
        out = net.denoise(clean, t, net.denoiser.encode_image(image))
    return (torch.cat(out, dim=1) if isinstance(out, tuple) else out).float()  # UniSegDiff: both heads


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerDiffusion, nnUNetTrainerDiffSegRecycling,
                                         nnUNetTrainerCrossTimestep, nnUNetTrainerUniSegDiff,
                                         nnUNetTrainerTextDiffSeg, nnUNetTrainerTextDiffSeg_recycled],
                         ids=lambda cls: cls.__name__)
def test_float16_on_a_patch_with_more_voxels_than_float16_can_count(trainer_cls, configuration_manager):
    """288 x 288 = 82944 voxels, with the mask's channel sums (~0.85 N) > 65504, in 2D (a 3D patch that size costs
    ~10x more here). One trainer per network (two encoders, one U-Net on [image | x_t], Cross-Timestep with FFT-,
    SC-tLSTM and APDS, UniSegDiff with DCA and its staged sampler, TextDiffSeg's latent with its attention and
    normalisation); bfloat16 has float32's range, so only
    float16 can overflow."""
    # _recycled: the same network with another training draw (its own estimate re-noised, an eps target of z_t - z0
    # scaled by 1 / sqrt(1 - abar), Min-SNR weights), whose sums over the patch are checked here too
    # TextDiffSeg's latent skips the plans' first two downsamplings: with three stages its latent grid is 72 x 72
    # (its attention 16x cheaper than at two stages' 144 x 144), while its label autoencoder still sums over 288 x 288
    textdiffseg = issubclass(trainer_cls, nnUNetTrainerTextDiffSeg)
    features = (4, 8, 16) if textdiffseg else (4, 8)
    net = build(trainer_cls, configuration_manager, dim=2, patch=[288, 288], features=features)
    image, labels = torch.randn(1, 1, 288, 288), mostly_background((288, 288))
    check_close_to_float32(net, image, labels, [torch.float16], 3.0 if trainer_cls.staged_sampler() else 1.0)
    half, full = (denoise_clean_mask(net, image, labels, dtype) for dtype in (torch.float16, torch.float32))
    assert torch.isfinite(half).all()
    # TextDiffSeg's output passes an image encoder with attention, the text cross-attention and a 3-level ResUNet
    # with self-attention: more float16 roundings in a row than the other denoisers (measured 5.2e-3)
    scale = 1.5 if textdiffseg else 1.0
    assert relative_error(half, full) < scale * TOLERANCES[torch.float16]["output"]


def test_fft_block_computes_in_float32_with_a_unit_scale_spectrum_on_a_large_3d_patch():
    """The FFT-tLSTM block alone on 48 x 48 x 32 = 73728 voxels: under autocast it runs in float32, so it equals
    its float32 result; its spectra are orthonormal, so the 1x1 filter sees values ~sqrt(N), not ~N (the
    unnormalised rfftn's DC coefficient, > 65504 here: inf in float16, then NaN everywhere; saturated gates
    in float32)."""
    torch.manual_seed(0)
    shape = (48, 48, 32)
    block = FFTTLSTM(C, 1, nn.Conv3d, time_embed_dim=16)
    x_t = labels_to_x0(mostly_background(shape), C) + 0.1 * torch.randn(1, C, *shape)
    image, emb = torch.randn(1, 1, *shape), torch.randn(1, 16)
    filter_inputs = []
    block.filter.register_forward_hook(lambda module, inputs, output: filter_inputs.append(inputs[0]))
    reference = block(x_t, block.condition_spectrum(image), emb, {})
    for dtype in HALF:
        with torch.autocast("cpu", dtype=dtype):
            out = block(x_t, block.condition_spectrum(image), emb, {})
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in filter_inputs)
    # Parseval: a coefficient has the RMS of the voxels; only the DC of a constant channel reaches sqrt(N) (x_t's
    # plus the projected image's)
    largest = max(x.abs().max().item() for x in filter_inputs)
    assert math.sqrt(math.prod(shape)) / 2 < largest < 4 * math.sqrt(math.prod(shape))
