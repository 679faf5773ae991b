"""ConcatImageDenoiser: the recycling paper's single U-Net on [image | noisy mask], and its trainers."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_diffusion.architectures.recycling.network import ConcatImageDenoiser, TwoEncoderCheckpointError
from nnunet_diffusion.architectures.conditional_unet import ImageConditionedDenoiser
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling
from nnunet_diffusion.trainers.recycling.variants import (nnUNetTrainerDiffSegRecycling_noRecycling,
                                                nnUNetTrainerDiffSegRecycling_twoEncoders)

C = 3            # classes incl. background
IMAGE_CHANNELS = 2
FEATURES = (4, 8, 16)  # three stages, so the decoder has unused deep-supervision heads to drop
TIME_DIM = 128   # ConcatImageDenoiser's default time_embed_dim


def denoiser(configuration_manager, dim):
    torch.manual_seed(0)
    kwargs = nnUNetTrainerDiffusionBase.plans_unet_kwargs(configuration_manager(dim, features=FEATURES))
    return ConcatImageDenoiser(IMAGE_CHANNELS, C, **kwargs), kwargs


@pytest.mark.parametrize("dim", [2, 3])
def test_shapes_and_interface(dim, configuration_manager):
    net, _ = denoiser(configuration_manager, dim)
    image, x_t = torch.randn(2, IMAGE_CHANNELS, *[8] * dim), torch.rand(2, C, *[8] * dim)
    condition = net.encode_image(image)
    assert condition is image and net.num_classes == C  # the image is the condition: nothing to precompute
    repeated = net.repeat_condition(condition, 3)
    assert repeated.shape == (6, IMAGE_CHANNELS, *[8] * dim)
    torch.testing.assert_close(repeated[3:6], image[1:2].expand(3, *image.shape[1:]))  # repeat_interleave
    out = net(x_t.repeat_interleave(3, 0), torch.tensor([0, 250, 500, 750, 1000, 1000]).long(), repeated)
    assert out.shape == (6, C, *[8] * dim)
    # first encoder conv sees image + mask channels; unused deep-supervision heads are gone
    assert net.encoder.stages[0][0].convs[0].conv.in_channels == IMAGE_CHANNELS + C
    assert all(isinstance(m, torch.nn.Identity) for m in net.decoder.seg_layers[:-1])


def test_image_and_timestep_both_change_the_output(configuration_manager):
    net, _ = denoiser(configuration_manager, 3)
    net.eval()
    image, x_t = torch.randn(1, IMAGE_CHANNELS, 8, 8, 8), torch.rand(1, C, 8, 8, 8)
    t = torch.tensor([250])
    with torch.no_grad():
        reference = net(x_t, t, image)
        other_image = net(x_t, t, image + torch.randn_like(image))
        other_t = net(x_t, torch.tensor([1000]), image)
        other_x = net(torch.rand_like(x_t), t, image)
    assert (reference - other_image).abs().max() > 1e-4
    assert (reference - other_t).abs().max() > 1e-4
    assert (reference - other_x).abs().max() > 1e-4


@pytest.mark.parametrize("dim", [2, 3])
def test_every_parameter_gets_a_gradient_in_a_training_pass(dim, configuration_manager):
    # nnU-Net's DDP uses find_unused_parameters=False: a parameter without gradient breaks multi-GPU training
    torch.manual_seed(0)
    net = nnUNetTrainerDiffSegRecycling.build_network_architecture(None, configuration_manager(dim, features=FEATURES),
                                                                   1, C, False)
    assert isinstance(net.denoiser, ConcatImageDenoiser)
    net.train()
    labels = torch.randint(0, C, (2, 1, *[8] * dim))
    res = net(torch.randn(2, 1, *[8] * dim), labels_to_x0(labels, C))
    torch.nn.functional.cross_entropy(res.output, labels[:, 0]).backward()
    without = [name for name, p in net.named_parameters() if p.grad is None]
    assert without == []


def conv_params(c_in, c_out, kernel_volume, bias=True):
    return c_in * c_out * kernel_volume + (c_out if bias else 0)


def test_parameter_count_is_a_plain_unet_on_image_plus_mask_plus_time_conditioning(configuration_manager):
    net, kwargs = denoiser(configuration_manager, 3)
    # by hand, for the test layout: 1 conv per stage, kernels 3^3, strides 2, conv bias, affine instance norm
    k, f, c_in = 27, FEATURES, IMAGE_CHANNELS + C
    encoder = sum(conv_params(a, b, k) + 2 * b for a, b in zip((c_in,) + f[:-1], f))
    decoder = sum(conv_params(f[s + 1], f[s], 8)                 # transposed conv, kernel = stride = 2
                  + conv_params(2 * f[s], f[s], k) + 2 * f[s]    # conv block on [upsampled | skip]
                  for s in range(len(f) - 1))
    head = conv_params(f[0], C, 1)                              # only the full-resolution seg layer
    time = 2 * conv_params(TIME_DIM, TIME_DIM, 1) + sum(conv_params(TIME_DIM, b, 1) for b in f)
    assert sum(p.numel() for p in net.parameters()) == encoder + decoder + head + time
    # and the same as dynamic_network_architectures' PlainConvUNet with image + mask channels, without its
    # unused low-resolution heads, plus the time MLP and per-stage projections
    plain = PlainConvUNet(c_in, num_classes=C, deep_supervision=False, **kwargs)
    unused_heads = sum(p.numel() for m in plain.decoder.seg_layers[:-1] for p in m.parameters())
    assert sum(p.numel() for p in plain.parameters()) - unused_heads == encoder + decoder + head
    two_encoders = ImageConditionedDenoiser(IMAGE_CHANNELS, C, **kwargs)
    assert sum(p.numel() for p in two_encoders.parameters()) > sum(p.numel() for p in net.parameters())


def test_old_two_encoder_checkpoint_fails_with_the_fix(configuration_manager):
    old = nnUNetTrainerDiffSegRecycling_twoEncoders.build_network_architecture(None, configuration_manager(3), 1, C,
                                                                               False)
    new = nnUNetTrainerDiffSegRecycling.build_network_architecture(None, configuration_manager(3), 1, C, False)
    assert isinstance(old.denoiser, ImageConditionedDenoiser)
    with pytest.raises(TwoEncoderCheckpointError, match="two-encoder network.*earlier version") as error:
        new.load_state_dict(old.state_dict())   # what nnU-Net's predictor does with checkpoint['network_weights']
    assert "-tr nnUNetTrainerDiffSegRecycling_twoEncoders" in str(error.value)
    assert "rename its results folder" in str(error.value) and "retrain" in str(error.value)
    # current checkpoints still load, into either network of their own kind
    fresh = nnUNetTrainerDiffSegRecycling.build_network_architecture(None, configuration_manager(3), 1, C, False)
    fresh.load_state_dict(new.state_dict())
    nnUNetTrainerDiffSegRecycling_twoEncoders.build_network_architecture(
        None, configuration_manager(3), 1, C, False).load_state_dict(old.state_dict())


def test_no_recycling_ablation_keeps_the_default_network(configuration_manager):
    net = nnUNetTrainerDiffSegRecycling_noRecycling.build_network_architecture(None, configuration_manager(3), 1, C,
                                                                               False)
    assert isinstance(net.denoiser, ConcatImageDenoiser) and net.recycling is False
