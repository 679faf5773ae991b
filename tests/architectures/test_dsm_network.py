"""DSM's networks: the order of the foreground classes carries no meaning (a consistent permutation permutes the
predictions and nothing else), the anomaly score leaves the background query out and in stage 2 comes from the organ
queries before they mix with the tumour queries, every parameter trains, and half precision stays finite on a patch
larger than float16 can count."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_configuration
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_diffusion.architectures.dsm.anomaly import anomaly_score
from nnunet_diffusion.architectures.dsm.network import DSMNetwork, DSMStage2Network, prompt_maps
from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase

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
    perm = [0, 3, 1, 2]  # background (label 0) stays first: eq. 14 leaves its query out
    image = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out, out_perm = net(image, full=True), permuted(net, perm)(image, full=True)
    torch.testing.assert_close(out_perm.logits, out.logits[:, perm], atol=1e-4, rtol=1e-4)
    for r, r_perm in zip(out.responses, out_perm.responses):
        torch.testing.assert_close(r_perm, r[:, perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_perm.class_logits, out.class_logits[:, perm][:, :, perm], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out_perm.anomaly, out.anomaly, atol=1e-5, rtol=1e-5)


def test_the_anomaly_score_ignores_the_background_query():
    """Stage 1: the anomaly map is eq. 14 over the organ queries of classes 1 and 3 (positions 1, 2), whatever the
    background query's mask: raising it everywhere changes the segmentation, not the anomaly map."""
    net = stage1(organ_classes=(0, 1, 3)).eval()
    assert net.scored_queries == [1, 2]
    with torch.no_grad():
        out = net(torch.randn(2, 1, 16, 16), full=True)
    torch.testing.assert_close(out.organ_masks, out.logits[:, [0, 1, 3]])  # stage 1: the final organ masks
    torch.testing.assert_close(out.anomaly, anomaly_score(out.organ_masks[:, 1:]))
    loud = out.organ_masks.clone()
    loud[:, 0] = 100.0
    torch.testing.assert_close(net.anomaly(loud), out.anomaly)
    assert not torch.allclose(anomaly_score(loud), anomaly_score(out.organ_masks))  # with it, the map would change


def test_stage_2_anomaly_comes_from_the_organ_queries_before_they_mix():
    """Stage 2's anomaly map is stage 1's, computed by the same (shared) stage-1 weights: the tumour queries and the
    self-attention after the kMMM decoder do not enter it; the organ classes' segmentation does change."""
    net = DSMStage2Network(stage1(organ_classes=(0, 1, 3)), [2], torch.nn.Conv2d).eval()
    image = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out, before = net(image, full=True), net.stage1(image, full=True)
        torch.nn.init.normal_(net.tumour_queries)  # other tumour queries: the same anomaly map
        other = net(image, full=True)
        _, maps = prompt_maps(net, image, torch.randn(1, TEXT_DIM))
    torch.testing.assert_close(out.organ_masks, before.organ_masks)
    torch.testing.assert_close(out.anomaly, before.anomaly)
    torch.testing.assert_close(other.anomaly, out.anomaly)
    torch.testing.assert_close(maps[:, 0], out.anomaly)
    assert not torch.allclose(out.logits[:, [0, 1, 3]], out.organ_masks)  # the mixed queries segment


def test_models_from_plans_without_the_anomaly_setting_score_as_they_were_trained():
    """plans.json of models trained before has no 'anomaly' entry: they build with the max over all organ queries
    (background included) and stage 2's map from the mixed queries; new plans get the organ queries only."""
    from nnunet_diffusion.trainers.dsm.trainer import ANOMALY_ORGAN_QUERIES, nnUNetTrainerDSM
    configuration = make_configuration(2, (8, 16, 32))
    settings = {"stage": 2, "organ_classes": [0, 1, 3], "tumour_classes": [2], "query_dim": 16, "max_kmmm_layers": 4,
                "kmeans": True, "text": {"dim": TEXT_DIM}, "amvp": True, "dqr": True}
    built = {}
    for name, extra in (("old", {}), ("new", {"anomaly": ANOMALY_ORGAN_QUERIES})):
        manager = ConfigurationManager({**configuration, "dsm": {**settings, **extra}})
        torch.manual_seed(0)
        built[name] = nnUNetTrainerDSM.build_network_architecture(None, manager, 1, 4, False).eval()
    assert built["old"].stage1.scored_queries == [0, 1, 2] and built["new"].stage1.scored_queries == [1, 2]
    built["new"].load_state_dict(built["old"].state_dict(), strict=True)  # the same weights fit both
    image = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        old, new = built["old"](image, full=True), built["new"](image, full=True)
    torch.testing.assert_close(old.anomaly, anomaly_score(old.logits[:, [0, 1, 3]]))  # the former map
    torch.testing.assert_close(new.anomaly, built["new"].stage1(image, full=True).anomaly)


def test_stage_2_trains_at_a_tenth_of_stage_1s_learning_rate_and_keeps_the_organ_mask_loss():
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nnunet_diffusion.trainers.dsm import variants as variants_dsm
    from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM, nnUNetTrainerDSMStage2
    assert nnUNetTrainerDSM.learning_rate == 1e-3 and nnUNetTrainerDSMStage2.learning_rate == 1e-4
    for name in variants_dsm.__all__:
        trainer = getattr(variants_dsm, name)
        assert trainer.learning_rate == (1e-4 if trainer.stage == 2 else 1e-3), name
    # dsm_loss of stage 2 = stage 1's terms on stage 2's output + stage 1's mask loss on the kMMM organ masks
    net = DSMStage2Network(stage1(organ_classes=(0, 1, 3)), [2], torch.nn.Conv2d)
    out = net(torch.randn(2, 1, 16, 16), full=True)
    labels = torch.randint(0, 4, (2, 1, 16, 16))
    loss = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           dice_class=MemoryEfficientSoftDiceLoss)
    owners = [SimpleNamespace(stage=stage, response_loss_weight=0.5, class_loss_weight=0.1, loss=loss,
                              configuration_manager=SimpleNamespace(configuration={"dsm": {
                                  "organ_classes": [0, 1, 3], "tumour_classes": [2]}}),
                              label_manager=SimpleNamespace(num_segmentation_heads=4)) for stage in (1, 2)]
    for owner in owners:
        owner.trained_classes = lambda: [0, 1, 3, 2]
    difference = nnUNetTrainerDSM.dsm_loss(owners[1], out, labels) - nnUNetTrainerDSM.dsm_loss(owners[0], out, labels)
    onehot = F.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    torch.testing.assert_close(difference, loss(out.organ_masks, onehot[:, [0, 1, 3]]))


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
            # an untrained network's top two logits are often a rounding apart: judge the voxels where float32
            # decides by more than bfloat16's resolution (2^-8 of the logits' scale)
            top2 = reference.logits.float().topk(2, dim=1).values
            decided = (top2[:, 0] - top2[:, 1]) > reference.logits.float().abs().amax() * 2 ** -7
            assert decided.float().mean() > 0.2
            agree = (out.logits.argmax(1) == reference.logits.argmax(1))[decided].float().mean()
            assert agree > 0.98, (dtype, agree)


def test_swin_unetr_backbone_gives_the_same_outputs():
    """MONAI's SwinUNETR as the backbone, with the outputs UNetPixelDecoder gives: decoder features at strides 32,
    16, 8, 4 feed the kMMM layers, and they and the pixel embedding are MONAI's own (its forward, unchanged, and
    the outputs of its encoder10 / decoder5 / decoder4 / decoder3 as hooks of the test record them)."""
    torch.manual_seed(0)
    net = DSMNetwork(1, 3, [0, 1, 2], text_dim=TEXT_DIM, dim=16, backbone="swin_unetr", **unet_kwargs(2)).eval()
    image = torch.randn(1, 1, 64, 64)
    swin, recorded = net.backbone.swin, []
    hooks = [m.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach().clone()))
             for m in (swin.encoder10, swin.decoder5, swin.decoder4, swin.decoder3)]
    with torch.no_grad():
        reference = swin(image)
        features, pixels = net.backbone(image)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(pixels, reference, rtol=0, atol=0)
    assert len(features) == 4 and len(recorded) == 8  # the test's hooks saw both forwards
    for feature, mine in zip(features, recorded[:4]):
        torch.testing.assert_close(feature, mine, rtol=0, atol=0)
    net.train()
    out = net(image, full=True)
    assert out.logits.shape == (1, 3, 64, 64)
    assert [tuple(r.shape[2:]) for r in out.responses] == [(2, 2), (4, 4), (8, 8), (16, 16)]
    out.logits.square().mean().backward()
    assert net.backbone.swin.encoder10.layer.conv1.conv.weight.grad is not None
    from nnunet_diffusion.architectures.dsm.backbone import SwinUNETRPixelDecoder
    with pytest.raises(ValueError, match="divisible by 32"):
        SwinUNETRPixelDecoder.check_patch([40, 40])


def test_kmmm_layers_run_at_the_papers_output_strides_only():
    """The features' output strides are the largest per-axis product of the plans' strides, bottleneck first: for a
    CT-like plan with strides (1,1,1), (1,2,2), (1,2,2), (2,2,2), (2,2,2), (1,2,2) the in-plane products 32, 16, 8, 4,
    2 (z: 4, 4, 2, 1, 1; the full-resolution stage gives the pixel embedding, no feature). min_output_stride=4 (the
    paper's 32 .. 4) keeps the first four, 1 (models from before) the finest four (16 .. 2)."""
    config = make_configuration(3, (4, 8, 8, 8, 8, 8))
    config["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2],
                                                        [1, 2, 2]]
    kwargs = nnUNetTrainerDiffusionBase.plans_unet_kwargs(ConfigurationManager(config))
    paper = DSMNetwork(1, 3, [0, 1, 2], text_dim=None, dim=8, min_output_stride=4, **kwargs)
    before = DSMNetwork(1, 3, [0, 1, 2], text_dim=None, dim=8, min_output_stride=1, **kwargs)
    assert paper.backbone.feature_strides == [32, 16, 8, 4, 2]
    assert paper.feature_indices == [0, 1, 2, 3] and before.feature_indices == [1, 2, 3, 4]
    # the scales the kMMM layers see: 2 x 1 x 1 (the bottleneck) to 8 x 8 x 8 with 4; 2 x 2 x 2 to 8 x 16 x 16 before
    image = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        shapes = [[tuple(r.shape[2:]) for r in net.query_decoder(image)[1]] for net in (paper, before)]
    assert shapes == [[(2, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)], [(2, 2, 2), (4, 4, 4), (8, 8, 8), (8, 16, 16)]]
    # a plan too shallow for stride 4 keeps its coarsest feature
    shallow = DSMNetwork(1, 3, [0, 1, 2], text_dim=None, dim=8, min_output_stride=4, **unet_kwargs(2, (8, 16)))
    assert shallow.backbone.feature_strides == [2] and shallow.feature_indices == [0]
