"""nnU-Net's deep supervision for 'x0' trainers (trainers/common/deep_supervision.py) and the recycling variant that
uses it: nnU-Net's weights, its nearest-exact target downsampling, the weighted loss by hand, every head trained."""
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch.nn.functional import cross_entropy

from conftest import make_configuration
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.trainers.common.deep_supervision import (deep_supervision_loss, deep_supervision_weights,
                                                               downsampled_target)
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
from nnunet_diffusion.trainers.cross_timestep.variants import nnUNetTrainerCrossTimestep_deepSupervision
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling
from nnunet_diffusion.trainers.recycling.variants import nnUNetTrainerDiffSegRecycling_deepSupervision

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3
FEATURES = (4, 8, 8, 8)  # 3 decoder stages: heads at 1/1 and 1/2 kept, the 1/4 one (nnU-Net's weight 0) not built
PATCH = (16, 16)


def ce_loss(logits, target):
    return cross_entropy(logits, target[:, 0].long())


def build(trainer_cls, block=None):
    torch.manual_seed(0)
    configuration = make_configuration(2, features=FEATURES, patch=list(PATCH))
    if block is not None:
        configuration["diffusion"] = block
    return trainer_cls.build_network_architecture(None, ConfigurationManager(configuration), 1, C, False)


def test_weights_are_nnunets():
    # nnU-Net, 4 outputs: [1, 1/2, 1/4, 1/8] with the last set to 0, normalised: [4/7, 2/7, 1/7, 0]
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_target_downsampling_is_nearest_exact_by_hand():
    target = torch.arange(16).reshape(1, 1, 4, 4)
    # nearest-exact at half size reads source index floor((i + 0.5) * 2) = 1, 3
    assert downsampled_target(target, (2, 2)).tolist() == [[[[5, 7], [13, 15]]]]
    assert downsampled_target(target, (4, 4)) is target
    assert downsampled_target(target.short(), (2, 2)).dtype == torch.int16


def test_loss_is_the_weighted_sum_of_each_heads_loss():
    torch.manual_seed(0)
    target = torch.randint(0, C, (2, 1, 8, 8))
    outputs = [torch.randn(2, C, 8, 8), torch.randn(2, C, 4, 4), torch.randn(2, C, 2, 2)]
    expected = sum(w * ce_loss(o, downsampled_target(target, o.shape[2:]))
                   for w, o in zip([4 / 7, 2 / 7, 1 / 7], outputs))
    torch.testing.assert_close(deep_supervision_loss(ce_loss, outputs, target), expected)


def test_the_variant_stores_it_and_the_default_does_not():
    assert nnUNetTrainerDiffSegRecycling_deepSupervision.diffusion_settings()["deep_supervision"] is True
    assert nnUNetTrainerDiffSegRecycling.diffusion_settings()["deep_supervision"] is False
    # a model stored before the setting existed rebuilds without the heads; the stored value wins over the class's
    old_block = {k: v for k, v in nnUNetTrainerDiffSegRecycling.diffusion_settings().items() if k != "deep_supervision"}
    for trainer_cls, block in [(nnUNetTrainerDiffSegRecycling, old_block),
                               (nnUNetTrainerDiffSegRecycling_deepSupervision, {**old_block, "deep_supervision": False})]:
        net = build(trainer_cls, block)
        assert not net.deep_supervision
        assert sum(not isinstance(h, torch.nn.Identity) for h in net.denoiser.decoder.seg_layers) == 1
    assert build(nnUNetTrainerDiffSegRecycling_deepSupervision).deep_supervision


def test_training_draw_supervises_every_kept_head_and_trains_it():
    net = build(nnUNetTrainerDiffSegRecycling_deepSupervision).train()
    labels = torch.randint(0, C, (2, 1, *PATCH))
    result = net(torch.randn(2, 1, *PATCH), labels_to_x0(labels, C))
    assert [tuple(o.shape[2:]) for o in result.lower_scale_logits] == [(8, 8)]
    owner = SimpleNamespace(loss=ce_loss)
    loss = nnUNetTrainerDiffusionBase.diffusion_loss(owner, result, labels)
    low = result.lower_scale_logits[0]
    expected = 2 / 3 * ce_loss(result.output, labels) + 1 / 3 * ce_loss(low, downsampled_target(labels, (8, 8)))
    torch.testing.assert_close(loss, expected)
    loss.backward()  # every head gets a gradient: nnU-Net's DDP (find_unused_parameters=False) needs it
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []


def test_cross_timestep_supervises_every_head_at_every_unrolled_step():
    net = build(nnUNetTrainerCrossTimestep_deepSupervision).train()
    labels = torch.randint(0, C, (2, 1, *PATCH))
    result = net(torch.randn(2, 1, *PATCH), labels_to_x0(labels, C))
    steps_trained = nnUNetTrainerCrossTimestep_deepSupervision.unroll_steps  # the default's 1 (after a warm-up)
    assert len(result.step_lower_logits) == len(result.step_logits) == steps_trained
    assert all([tuple(o.shape[2:]) for o in lower] == [(8, 8)] for lower in result.step_lower_logits)
    loss = nnUNetTrainerDiffusionBase.diffusion_loss(SimpleNamespace(loss=ce_loss), result, labels)
    low_target = downsampled_target(labels, (8, 8))
    steps = [2 / 3 * ce_loss(logits, labels) + 1 / 3 * ce_loss(lower[0], low_target)
             for logits, lower in zip(result.step_logits, result.step_lower_logits)]
    torch.testing.assert_close(loss, sum(steps) / steps_trained + ce_loss(result.prior_logits, labels))  # + prior
    loss.backward()
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []


def test_prediction_is_the_full_resolution_head():
    ds, plain = build(nnUNetTrainerDiffSegRecycling_deepSupervision).eval(), build(nnUNetTrainerDiffSegRecycling).eval()
    x, image, t = torch.randn(1, C, *PATCH), torch.randn(1, 1, *PATCH), torch.tensor([3])
    with torch.no_grad():
        torch.testing.assert_close(ds.denoiser(x, t, image), ds.denoiser(x, t, image, all_scales=True)[0])
        assert ds(image).shape == plain(image).shape == (1, C, *PATCH)


def test_a_denoiser_without_heads_is_refused():
    class NoHeads(nnUNetTrainerDiffSegRecycling_deepSupervision):
        @classmethod
        def build_denoiser(cls, configuration_manager, num_input_channels, num_classes, stored):
            return nnUNetTrainerDiffSegRecycling.build_denoiser(configuration_manager, num_input_channels,
                                                               num_classes, {**stored, "deep_supervision": False})
    with pytest.raises(NotImplementedError, match="no deep-supervision heads"):
        build(NoHeads)
