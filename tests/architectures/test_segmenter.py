import pytest
import torch

from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.diffusion.trainer import nnUNetTrainerDiffusion
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling

C = 3  # classes incl. background


def build(trainer_cls, configuration_manager, dim=3, sampler=None):
    torch.manual_seed(0)
    net = trainer_cls.build_network_architecture(None, configuration_manager(dim), 1, C, False)
    if sampler is not None:
        net.set_sampler(sampler)
    return net.eval()


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerDiffusion, nnUNetTrainerDiffSegRecycling])
def test_eval_forward_is_a_distribution_over_classes(trainer_cls, dim, configuration_manager):
    net = build(trainer_cls, configuration_manager, dim, SamplerSettings(kind="ddim", steps=2))
    image = torch.randn(2, 1, *[8] * dim)
    with torch.no_grad():
        logits = net(image)
        x0 = net.sample_x0(image)
    assert logits.shape == (2, C, *[8] * dim)
    probabilities = torch.softmax(logits, 1)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, *[8] * dim))
    # the softmax of the output is exactly the sampler's (clamped, renormalised) mask estimate
    expected = ((x0[:, 0] + 1) / 2).clamp_min(1e-6)
    torch.testing.assert_close(probabilities, expected / expected.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_same_seed_same_prediction_other_seed_differs(configuration_manager):
    net = build(nnUNetTrainerDiffusion, configuration_manager, sampler=SamplerSettings(kind="ddpm", steps=4, seed=1))
    image = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        a, b = net(image), net(image)
        net.set_sampler(SamplerSettings(kind="ddpm", steps=4, seed=2))
        c = net(image)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_image_encoded_once_per_patch_and_samples_batched(configuration_manager):
    net = build(nnUNetTrainerDiffusion, configuration_manager, sampler=SamplerSettings(kind="ddim", steps=4,
                                                                                        num_samples=3))
    calls = {"image": [], "denoise": []}
    net.denoiser.image_encoder.register_forward_hook(lambda m, i, o: calls["image"].append(i[0].shape[0]))
    net.denoiser.register_forward_hook(lambda m, i, o: calls["denoise"].append(i[0].shape[0]))
    with torch.no_grad():
        out = net(torch.randn(2, 1, 8, 8, 8))
    assert calls["image"] == [2]            # once per patch batch, not per step or sample
    assert calls["denoise"] == [6] * 4      # 4 steps, 2 patches x 3 samples in one batch
    assert out.shape == (2, C, 8, 8, 8)


def test_samples_are_averaged(configuration_manager):
    net = build(nnUNetTrainerDiffusion, configuration_manager, sampler=SamplerSettings(kind="ddpm", steps=2,
                                                                                        num_samples=2))
    image = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        x0 = net.sample_x0(image)
        out = net(image)
    assert (x0[:, 0] - x0[:, 1]).abs().max() > 1e-4   # two different samples
    p = ((x0 + 1) / 2).clamp_min(1e-6)
    p = (p / p.sum(2, keepdim=True)).mean(1)
    torch.testing.assert_close(torch.softmax(out, 1), p, rtol=1e-4, atol=1e-5)


def test_recycling_only_second_pass_carries_gradient(configuration_manager):
    net = build(nnUNetTrainerDiffSegRecycling, configuration_manager).train()
    grad_modes, timesteps = [], []

    def hook(module, inputs, output):
        grad_modes.append(torch.is_grad_enabled())
        timesteps.append(inputs[1].tolist())
    net.denoiser.register_forward_hook(hook)
    labels = torch.randint(0, C, (2, 1, 8, 8, 8))
    result = net(torch.randn(2, 1, 8, 8, 8), labels_to_x0(labels, C))
    assert grad_modes == [False, True]
    assert timesteps[0] == [1000, 1000]      # first pass at the last step (original index of the 5-step chain)
    assert all(t in (0, 250, 500, 750) for t in timesteps[1])  # second pass at t in 0..T-2
    assert result.regression_target is None and result.output.requires_grad
    torch.testing.assert_close(result.x0_hat, torch.softmax(result.output, 1) * 2 - 1)


def test_eps_training_pass_regresses_onto_the_noise(configuration_manager):
    net = build(nnUNetTrainerDiffusion, configuration_manager).train()
    labels = torch.randint(0, C, (2, 1, 8, 8, 8))
    torch.manual_seed(4)
    result = net(torch.randn(2, 1, 8, 8, 8), labels_to_x0(labels, C))
    assert result.regression_target.shape == result.output.shape == (2, C, 8, 8, 8)
    assert abs(result.regression_target.std().item() - 1) < 0.1
    loss = torch.mean((result.output - result.regression_target) ** 2)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())  # image branch, time MLP and decoder all train


def test_invalid_sampler_settings_fail_when_building(configuration_manager, monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", "3")
    with pytest.raises(ValueError, match="Cannot respace a 1000-step schedule to 3 steps"):
        nnUNetTrainerDiffusion.build_network_architecture(None, configuration_manager(3), 1, C, False)
    monkeypatch.setenv("NNUNET_DIFFUSION_STEPS", "2")
    monkeypatch.setenv("NNUNET_DIFFUSION_SAMPLER", "heun")
    with pytest.raises(ValueError, match="Unknown sampler 'heun'"):
        nnUNetTrainerDiffusion.build_network_architecture(None, configuration_manager(3), 1, C, False)


def test_stored_settings_win_over_class_defaults_and_env_over_both(configuration_manager, monkeypatch):
    stored = {"diffusion": {**nnUNetTrainerDiffusion.diffusion_settings(),
                            "sampler": {"kind": "ddpm", "steps": 4, "num_samples": 2, "seed": 3}}}
    net = nnUNetTrainerDiffusion.build_network_architecture(None, configuration_manager(3, extra=stored), 1, C)
    assert net.sampler == SamplerSettings("ddpm", 4, 2, 3)
    monkeypatch.setenv("NNUNET_DIFFUSION_SEED", "9")
    net = nnUNetTrainerDiffusion.build_network_architecture(None, configuration_manager(3, extra=stored), 1, C)
    assert net.sampler == SamplerSettings("ddpm", 4, 2, 9)


@pytest.mark.parametrize("denoiser_cls", ["ImageConditionedDenoiser", "ConcatImageDenoiser"])
def test_plans_denoisers_are_initialised_as_nnunet_initialises_its_unet(denoiser_cls, configuration_manager):
    """nnU-Net's InitWeights_He(1e-2): convolution weights He-normal (std sqrt(2 / ((1 + a^2) fan_in))), biases 0."""
    from nnunet_diffusion.architectures import conditional_unet
    from nnunet_diffusion.architectures.recycling import network as concat_unet
    from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
    cls = getattr(conditional_unet, denoiser_cls, None) or getattr(concat_unet, denoiser_cls)
    torch.manual_seed(0)
    net = cls(1, 3, **nnUNetTrainerDiffusionBase.plans_unet_kwargs(configuration_manager(3, features=(32, 64))))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.weight[0].numel() >= 27 * 32]
    assert convs
    for conv in convs:
        fan_in = conv.weight[0].numel()
        expected = (2 / ((1 + 1e-4) * fan_in)) ** 0.5
        assert float(conv.weight.std()) == pytest.approx(expected, rel=0.1)   # PyTorch's default: ~0.58x this
        if conv.bias is not None:
            assert float(conv.bias.abs().max()) == 0
