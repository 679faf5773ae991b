"""UniSegDiff's networks and staged segmenter: where DCA goes, what is frozen, the staged sampler's calls and values."""
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_diffusion.architectures.unisegdiff.dnet import UniSegDiffDenoiser, stage_voxels
from nnunet_diffusion.architectures.unisegdiff.segmenter import StagedDiffusionSegmenter
from nnunet_diffusion.diffusion.gaussian import eps_from_x0
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.diffusion.schedules import make_schedule
from nnunet_diffusion.diffusion.staged import StagedTargets
from nnunet_diffusion.trainers.unisegdiff.trainer import nnUNetTrainerUniSegDiff
from nnunet_diffusion.trainers.unisegdiff.variants import (nnUNetTrainerUniSegDiff_noPretraining,
                                                          nnUNetTrainerUniSegDiff_epsLastJump)

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3


def test_stage_voxels_divides_the_patch_by_the_cumulative_strides():
    assert stage_voxels((40, 224, 224), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]) == [
        40 * 224 * 224, 40 * 112 * 112, 20 * 56 * 56, 10 * 28 * 28]
    assert stage_voxels((40, 40), [1, 2, 2]) == [1600, 400, 100]


def denoiser(configuration_manager, dim=2, features=(4, 8, 16), **kwargs):
    cm = configuration_manager(dim, features=features)
    return UniSegDiffDenoiser(1, C, **nnUNetTrainerUniSegDiff.plans_unet_kwargs(cm), **kwargs)


def test_dca_only_at_stages_small_enough(configuration_manager):
    # strides (1, 2, 2) on a 32 x 32 patch: 1024, 256, 64 voxels
    net = denoiser(configuration_manager, patch_size=(32, 32), max_tokens=256)
    assert net.dca_stages == (1, 2) and set(net.dca) == {"1", "2"}
    assert denoiser(configuration_manager, patch_size=(32, 32), use_dca=False).dca_stages == ()


def test_pretrained_cfenet_is_frozen_at_build_and_joint_encoder_is_not(configuration_manager):
    net = denoiser(configuration_manager, patch_size=(16, 16))
    assert net.cfenet_frozen() and not any(p.requires_grad for p in net.cfenet.parameters())
    assert all(p.requires_grad for name, p in net.named_parameters() if not name.startswith("cfenet."))
    joint = denoiser(configuration_manager, patch_size=(16, 16), condition="joint")
    assert all(p.requires_grad for p in joint.parameters())


def staged_segmenter(configuration_manager, sampler=SamplerSettings("staged", 10, 4, 0, "mean")):
    torch.manual_seed(0)
    net = nnUNetTrainerUniSegDiff.build_network_architecture(
        None, ConfigurationManager(configuration_manager(2, features=(4, 8)).configuration), 1, C, False)
    net.set_sampler(sampler)
    return net


def test_a_staged_training_step_trains_dnet_and_leaves_the_frozen_cfenet_unchanged(configuration_manager):
    net = staged_segmenter(configuration_manager).train()
    before = {k: v.clone() for k, v in net.denoiser.cfenet.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)  # decay would move frozen weights
    labels = torch.randint(0, C, (2, 1, 16, 16))
    result = net(torch.randn(2, 1, 16, 16), labels_to_x0(labels, C))
    result.loss(labels).backward()
    assert all(p.grad is None for p in net.denoiser.cfenet.parameters())
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    assert any(n.startswith("denoiser.decoders.eps.") for n in trainable)
    assert any(n.startswith("denoiser.decoders.x0.") for n in trainable)
    optimizer.step()
    for key, value in net.denoiser.cfenet.state_dict().items():
        assert torch.equal(value, before[key]), key


def count_calls(net):
    calls = []
    net.denoiser.register_forward_hook(lambda module, args, kwargs_or_out: calls.append(args[0].shape[0]))
    return calls


def test_staged_sampler_makes_twelve_sequential_calls_and_twenty_masks(configuration_manager):
    net = staged_segmenter(configuration_manager, SamplerSettings("staged", 10, 20, 0, "mean")).eval()
    calls = count_calls(net)
    with torch.no_grad():
        masks = net.sample_x0(torch.randn(2, 1, 16, 16))
    # one x0 jump (B), ten middle DDIM steps (both branches: 2B), one last evaluation of both branches' X_299 (2B)
    assert calls == [2] + [4] * 10 + [4]
    assert net.network_calls() == 12
    assert masks.shape == (2, 20, C, 16, 16) and masks.min() >= -1 and masks.max() <= 1


def test_each_middle_chain_runs_only_the_decoder_it_needs(configuration_manager):
    """The middle steps decode the mask chain with the x0 decoder and the noise chain with the eps decoder only (one
    encoder pass for both), and give what each decoder gives on its own chain."""
    net = staged_segmenter(configuration_manager, SamplerSettings("staged", 10, 4, 0, "mean")).eval()
    denoiser = net.denoiser
    x, t = torch.randn(4, C, 16, 16), torch.tensor([500, 500, 500, 500])
    with torch.no_grad():
        condition = [torch.cat([f, f]) for f in denoiser.encode_image(torch.randn(2, 1, 16, 16))]
        chunked = denoiser(x, t, condition, chunk_heads=("x0", "eps"))
        eps_hat, logits = denoiser(x, t, condition)
    torch.testing.assert_close(chunked, torch.cat([logits[:2], eps_hat[2:]]), atol=1e-5, rtol=1e-5)
    decoded = {head: [] for head in denoiser.decoders}
    for head, decoder in denoiser.decoders.items():
        decoder.register_forward_hook(lambda m, i, o, head=head: decoded[head].append(o.shape[0]))
    with torch.no_grad():
        net.sample_x0(torch.randn(2, 1, 16, 16))
    # x0: the first jump (2) + 10 middle mask-chain halves (2) + the last jump (4); eps: the 10 noise-chain halves
    assert decoded == {"x0": [2] + [2] * 10 + [4], "eps": [2] * 10}


class PerfectDenoiser(torch.nn.Module):
    """Knows the mask M: the x0 head returns logits whose softmax is M's one-hot, the eps head the noise that M
    implies for x_t at the noise level the staged sampler uses for the conditioning timestep (0 means t = lower)."""

    def __init__(self, mask, schedule, lower):
        super().__init__()
        self.mask, self.schedule, self.lower, self.num_classes = mask, schedule, lower, mask.shape[1]

    def encode_image(self, image):
        return [image]

    def repeat_condition(self, features, n):
        return [f.repeat_interleave(n, 0) for f in features]

    def forward(self, x_t, t, condition, head=None, chunk_heads=None):
        if chunk_heads is not None:  # as UniSegDiffDenoiser: chunk i through head chunk_heads[i] only
            return torch.cat([self.forward(x, s, condition, name) for name, x, s in
                              zip(chunk_heads, x_t.chunk(len(chunk_heads)), t.chunk(len(chunk_heads)))])
        noise_level = torch.where(t == 0, torch.full_like(t, self.lower), t)
        mask = self.mask.expand(x_t.shape[0], *self.mask.shape[1:])
        out = {"x0": (mask + 1) * 50.0,  # softmax of +-50-logit gaps: the one-hot exactly, in float32
               "eps": eps_from_x0(self.schedule, x_t, noise_level, mask)}
        return out[head] if head else (out["eps"], out["x0"])


def test_staged_sampler_with_a_perfect_denoiser_returns_the_mask_in_every_sample():
    """Every jump and the final draw use the right noise levels: any slip (e.g. x0 from eps at the conditioning
    t = 0 instead of t = 299) moves the masks away from M. The draws land at t = 0: M up to sigma ~ 0.01 noise."""
    schedule = make_schedule("linear", 1000)
    labels = torch.randint(0, C, (1, 1, 8, 8))
    mask = labels_to_x0(labels, C)
    for head in ("eps", "x0"):
        net = StagedDiffusionSegmenter(PerfectDenoiser(mask, schedule, 299), schedule,
                                       SamplerSettings("staged", 10, 6, 0, "mean"), StagedTargets(), head)
        masks = net.sample_x0(torch.randn(2, 1, 8, 8))
        torch.testing.assert_close(masks, mask[:, None].expand(2, 6, C, 8, 8), atol=0.06, rtol=0)
        assert torch.equal(masks.argmax(2), labels[:, :1].expand(2, 6, 8, 8))


class RecordingDenoiser(PerfectDenoiser):
    """The perfect denoiser that records what its last call saw and which head it was."""

    def forward(self, x_t, t, condition, head=None, chunk_heads=None):
        self.last = (x_t.clone(), t.clone(), head)
        return super().forward(x_t, t, condition, head, chunk_heads)


@pytest.mark.parametrize("head", ["eps", "x0"])
def test_the_samples_are_drawn_from_each_branchs_x299_state(head):
    """Sec. 2.2: the two chain states at t = 299 (mask branch, noise branch) are each sampled P = 3 times: one
    evaluation of the last head on the two states, then P draws from each, differing only by their fresh noise."""
    from nnunet_diffusion.diffusion.staged import ddim_jump
    schedule = make_schedule("linear", 1000)
    mask = labels_to_x0(torch.randint(0, C, (1, 1, 8, 8)), C)
    denoiser = RecordingDenoiser(mask, schedule, 299)
    net = StagedDiffusionSegmenter(denoiser, schedule, SamplerSettings("staged", 10, 6, 0, "mean"), StagedTargets(),
                                   head)
    states = {}
    masks = net.sample_x0(torch.randn(2, 1, 8, 8), on_step=lambda t, x: states.setdefault(t, x))
    x299, t, called_head = denoiser.last
    assert called_head == head and t.tolist() == [0] * 4 and x299.shape == (4, C, 8, 8)  # 2 branches x 2 patches
    assert masks.shape == (2, 6, C, 8, 8)
    # x299 is the DDIM step 329 -> 299 of each chain from its x0 estimate at 329 (on_step sees it)
    assert states[329].shape == (4, C, 8, 8)
    for branch in range(2):
        for patch in range(2):
            drawn = masks[patch, 3 * branch:3 * branch + 3]
            state = x299[2 * branch + patch]
            # each draw = the deterministic jump from this branch's X_299 + its own noise, sigma ~ 0.01
            centre = ddim_jump(schedule, state[None], torch.tensor([299]), 0, mask, eta=1.0,
                               noise=torch.zeros_like(mask))[0]
            assert ((drawn - centre).abs() < 0.06).all()
            assert not torch.allclose(drawn[0], drawn[1]) and not torch.allclose(drawn[1], drawn[2])


def test_mirrored_copies_share_their_noise(configuration_manager):
    net = staged_segmenter(configuration_manager).eval()
    image = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        alone = net.sample_x0(image)
        batched = net.sample_x0(torch.cat([image, image]), copies=2)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0, 0], alone[0, 1])  # the samples differ from each other


@pytest.mark.parametrize("sampler, message", [
    (SamplerSettings("ddim", 10, 20), "staged"),
    (SamplerSettings("staged", 7, 20), "Valid NNUNET_DIFFUSION_STEPS"),
    (SamplerSettings("staged", 10, 5), "must be even"),
    (SamplerSettings("staged", 10, 4, fusion="vote"), "Unknown fusion"),
])
def test_staged_sampler_settings_are_validated_with_the_fix_in_the_message(configuration_manager, sampler, message):
    with pytest.raises(ValueError, match=message):
        staged_segmenter(configuration_manager, sampler)


def test_the_staged_sampler_is_refused_by_other_models(configuration_manager):
    from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
    net = nnUNetTrainerDiffusion.build_network_architecture(
        None, ConfigurationManager(configuration_manager(2, features=(4, 8)).configuration), 1, C, False)
    with pytest.raises(ValueError, match="UniSegDiff"):
        net.set_sampler(SamplerSettings("staged", 10, 2))


def test_staple_fusion_follows_the_consensus_of_the_samples(configuration_manager):
    """Five samples of which four agree: STAPLE's fused labels are theirs wherever they agree."""
    net = staged_segmenter(configuration_manager, SamplerSettings("staged", 10, 4, 0, "staple"))
    labels = torch.randint(0, C, (5, 8, 8))
    labels[1:4] = labels[0]
    labels[4] = (labels[0] + 1) % C
    members = torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()[None]  # (1, 5, C, 8, 8)
    fused = net.fuse(members)
    assert fused.shape == (1, C, 8, 8)
    assert torch.equal(fused.argmax(1)[0], labels[0])
    torch.testing.assert_close(fused.exp().sum(1), torch.ones(1, 8, 8))


def test_joint_ablation_trains_its_condition_encoder(configuration_manager):
    net = nnUNetTrainerUniSegDiff_noPretraining.build_network_architecture(
        None, ConfigurationManager(configuration_manager(2, features=(4, 8)).configuration), 1, C, False).train()
    labels = torch.randint(0, C, (2, 1, 16, 16))
    net(torch.randn(2, 1, 16, 16), labels_to_x0(labels, C)).loss(labels).backward()
    assert all(p.grad is not None for p in net.denoiser.cfenet.parameters())


def test_the_last_jump_head_is_a_stored_setting_x0_by_default(configuration_manager):
    assert nnUNetTrainerUniSegDiff.diffusion_settings()["last_jump_head"] == "x0"
    assert nnUNetTrainerUniSegDiff_epsLastJump.diffusion_settings()["last_jump_head"] == "eps"
    configuration = ConfigurationManager(configuration_manager(2, features=(4, 8)).configuration)
    assert staged_segmenter(configuration_manager).inference_plan()[-1].head == "x0"
    net = nnUNetTrainerUniSegDiff.build_network_architecture(None, configuration, 1, C, False)
    net.set_sampler(SamplerSettings("staged", 10, 4, 0, "mean"))
    assert net.last_head == "x0" and net.inference_plan()[-1].head == "x0"
    eps = nnUNetTrainerUniSegDiff_epsLastJump.build_network_architecture(None, configuration, 1, C, False)
    assert eps.last_head == "eps"
    with pytest.raises(ValueError, match="heads"):
        StagedDiffusionSegmenter(net.denoiser, net.schedule, None, StagedTargets(), "chain")


def test_staged_inference_runs_through_the_one_reverse_loop(configuration_manager, monkeypatch):
    """After the first x0 jump, the middle stage and the last evaluation are one run of
    diffusion.samplers.run_reverse_process on the chain of their timesteps (X_599 ... X_299)."""
    from nnunet_diffusion.architectures.unisegdiff import segmenter as staged
    net = staged_segmenter(configuration_manager).eval()
    runs, real = [], staged.run_reverse_process

    def recording(fn, x, schedule, *args, **kwargs):
        runs.append(schedule.timesteps.tolist())
        return real(fn, x, schedule, *args, **kwargs)
    monkeypatch.setattr(staged, "run_reverse_process", recording)
    with torch.no_grad():
        net.sample_x0(torch.randn(2, 1, 16, 16))
    assert runs == [list(range(299, 600, 30))]


def test_dca_runs_at_the_stages_the_stored_voxel_limit_allows(configuration_manager):
    """A 4-stage 2d plan at 40 x 40 has stages of 1600, 400, 100 and 25 voxels: the default's limit of 256 voxels puts
    DCA at the last two, the _dcaMaxTokens1024 variant's (and a plans.json from before the setting) at three."""
    from nnunet_diffusion.trainers.unisegdiff.variants import nnUNetTrainerUniSegDiff_dcaMaxTokens1024
    configuration = configuration_manager(2, features=(4, 8, 8, 8), patch=[40, 40])
    stored = nnUNetTrainerUniSegDiff.diffusion_settings()
    assert stored["dca_max_tokens"] == 256
    assert nnUNetTrainerUniSegDiff.build_denoiser(configuration, 1, C, stored).dca_stages == (2, 3)
    legacy = {k: v for k, v in stored.items() if k != "dca_max_tokens"}
    assert nnUNetTrainerUniSegDiff.build_denoiser(configuration, 1, C, legacy).dca_stages == (1, 2, 3)
    variant = nnUNetTrainerUniSegDiff_dcaMaxTokens1024.diffusion_settings()
    assert nnUNetTrainerUniSegDiff.build_denoiser(configuration, 1, C, variant).dca_stages == (1, 2, 3)
