"""DSM's networks: class order carries no meaning (a consistent permutation permutes the predictions and nothing
else), every parameter trains, and half precision stays finite on a patch larger than float16 can count."""
import copy

import pytest
import torch
from conftest import make_configuration
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_diffusion.architectures.dsm.network import DSMNetwork, DSMStage2Network, prompt_maps
from nnunet_diffusion.trainers.base import nnUNetTrainerDiffusionBase

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT_DIM = 8


def unet_kwargs(dim=2, features=(8, 16, 32)):
    return nnUNetTrainerDiffusionBase.plans_unet_kwargs(ConfigurationManager(make_configuration(dim, features)))


def stage1(organ_classes=(0, 1, 2, 3), num_classes=4, dim=2, **kwargs):
    torch.manual_seed(0)
    net = DSMNetwork(1, num_classes, list(organ_classes), text_dim=TEXT_DIM, dim=16, **unet_kwargs(dim), **kwargs)
    with torch.no_grad():
        net.text_embeddings.copy_(torch.randn(num_classes, TEXT_DIM))
    return net


def permuted(net: DSMNetwork, perm: list) -> DSMNetwork:
    """The same model with its classes in another order: query k of the result is query perm[k] of ``net`` (and its
    text, and its channel in every kMMM layer's SSM)."""
    other = copy.deepcopy(net)
    index = torch.tensor(perm)
    with torch.no_grad():
        other.organ_queries.copy_(net.organ_queries[index])
        other.text_embeddings.copy_(net.text_embeddings[index])
        for layer_net, layer_other in zip(net.layers, other.layers):
            block, block_other = layer_net.ssm.mamba.layers[0], layer_other.ssm.mamba.layers[0]
            block_other.mixer.in_proj.weight.copy_(block.mixer.in_proj.weight[:, index])
            block_other.mixer.out_proj.weight.copy_(block.mixer.out_proj.weight[index])
            block_other.norm.weight.copy_(block.norm.weight[index])
    return other


def test_permuting_the_classes_permutes_the_predictions_and_nothing_else():
    net = stage1().eval()
    perm = [2, 0, 3, 1]
    image = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out, out_perm = net(image, full=True), permuted(net, perm)(image, full=True)
    torch.testing.assert_close(out_perm.logits, out.logits[:, perm], atol=1e-4, rtol=1e-4)
    for r, r_perm in zip(out.responses, out_perm.responses):
        torch.testing.assert_close(r_perm, r[:, perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_perm.class_logits, out.class_logits[:, perm][:, :, perm], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out_perm.anomaly, out.anomaly, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_every_parameter_gets_a_gradient(stage):
    """What DDP without find_unused_parameters needs: a loss on logits, responses and class logits reaches all."""
    net = stage1(organ_classes=(0, 1, 3), dim=3)
    if stage == 2:
        net = DSMStage2Network(net, [2], torch.nn.Conv3d)
    out = net(torch.randn(2, 1, 8, 8, 8), full=True)
    (out.logits.square().mean() + sum(r.square().mean() for r in out.responses)
     + out.class_logits.square().mean()).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("stage", [1, 2])
def test_half_precision_on_a_patch_with_more_voxels_than_float16_can_count(stage):
    net = stage1(organ_classes=(0, 1, 3))
    if stage == 2:
        net = DSMStage2Network(net, [2], torch.nn.Conv2d)
    image = torch.randn(1, 1, 288, 288)  # 82944 voxels > 65504
    with torch.no_grad():
        reference = net(image, full=True)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                out = net(image, full=True)
                logits, maps = prompt_maps(net, image, torch.randn(2, TEXT_DIM))
            for value in (out.logits, out.class_logits, out.anomaly, logits, maps, *out.responses):
                assert torch.isfinite(value).all(), dtype
            agree = (out.logits.argmax(1) == reference.logits.argmax(1)).float().mean()
            assert agree > 0.98, (dtype, agree)


def test_swin_unetr_backbone_gives_the_same_outputs():
    """MONAI's SwinUNETR as the backbone: decoder features at strides 32, 16, 8, 4 feed the kMMM layers."""
    torch.manual_seed(0)
    net = DSMNetwork(1, 3, [0, 1, 2], text_dim=TEXT_DIM, dim=16, backbone="swin_unetr", **unet_kwargs(2))
    out = net(torch.randn(1, 1, 64, 64), full=True)
    assert out.logits.shape == (1, 3, 64, 64)
    assert [tuple(r.shape[2:]) for r in out.responses] == [(2, 2), (4, 4), (8, 8), (16, 16)]
    out.logits.square().mean().backward()
    assert net.backbone.swin.encoder10.layer.conv1.conv.weight.grad is not None
    from nnunet_diffusion.architectures.dsm.backbone import SwinUNETRPixelDecoder
    with pytest.raises(ValueError, match="divisible by 32"):
        SwinUNETRPixelDecoder.check_patch([40, 40])
