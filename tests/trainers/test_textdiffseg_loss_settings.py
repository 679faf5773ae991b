"""TextDiffSeg's segmentation-loss settings (eq. 4 on the decoded denoised latent, the reconstruction term): stored
in plans.json, switched by the variants, read back by the segmenter; an older plans.json keeps its loss; and with
the real network every trainable parameter gets a gradient from one step (DDP's rule) in every setting."""
import copy

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg
from nnunet_diffusion.trainers.textdiffseg.variants import (nnUNetTrainerTextDiffSeg_labelFeatures8,
                                                            nnUNetTrainerTextDiffSeg_lambda1,
                                                            nnUNetTrainerTextDiffSeg_lambda1en1,
                                                            nnUNetTrainerTextDiffSeg_noReconstructionLoss,
                                                            nnUNetTrainerTextDiffSeg_pretrainedLabelAE,
                                                            nnUNetTrainerTextDiffSeg_reconstructionLossOnly,
                                                            nnUNetTrainerTextDiffSeg_sampledTimesteps,
                                                            nnUNetTrainerTextDiffSeg_scaledLinear,
                                                            nnUNetTrainerTextDiffSeg_scaledLinear_sampledTimesteps,
                                                            nnUNetTrainerTextDiffSeg_x0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("trainer_cls, terms", [(nnUNetTrainerTextDiffSeg, "denoised+reconstruction"),
                                                (nnUNetTrainerTextDiffSeg_noReconstructionLoss, "denoised"),
                                                (nnUNetTrainerTextDiffSeg_reconstructionLossOnly, "reconstruction")])
def test_settings_are_stored_and_reach_the_segmenter(trainer_cls, terms, configuration_manager):
    settings = trainer_cls.diffusion_settings()["textdiffseg"]
    assert settings["segmentation_loss"] == terms and settings["denoised_latent"] == "x0_estimate"
    config = configuration_manager(2)
    config.configuration["diffusion"].update(copy.deepcopy(trainer_cls.diffusion_settings()))
    stored = trainer_cls.stored_settings(config)
    segmenter = trainer_cls.build_segmenter(torch.nn.Identity(), trainer_cls.training_schedule(stored),
                                            SamplerSettings(), stored)
    assert segmenter.segmentation_loss == terms and segmenter.denoised_latent == "x0_estimate"


def test_a_plans_json_from_before_the_setting_keeps_the_reconstruction_loss(configuration_manager):
    """Its textdiffseg block lacks the keys: the model resumes with the loss it was trained with."""
    config = configuration_manager(2)
    block = copy.deepcopy(nnUNetTrainerTextDiffSeg.diffusion_settings())
    del block["textdiffseg"]["segmentation_loss"], block["textdiffseg"]["denoised_latent"]
    config.configuration["diffusion"].update(block)
    stored = nnUNetTrainerTextDiffSeg.stored_settings(config)
    segmenter = nnUNetTrainerTextDiffSeg.build_segmenter(
        torch.nn.Identity(), nnUNetTrainerTextDiffSeg.training_schedule(stored), SamplerSettings(), stored)
    assert segmenter.segmentation_loss == "reconstruction"


@pytest.mark.parametrize("trainer_cls, weight", [(nnUNetTrainerTextDiffSeg, 0.3),
                                                 (nnUNetTrainerTextDiffSeg_lambda1, 1.0),
                                                 (nnUNetTrainerTextDiffSeg_lambda1en1, 0.1)])
def test_eq6_lambda_is_stored_and_weighs_the_eps_mse(trainer_cls, weight, configuration_manager):
    """lambda is stored in plans.json, reaches the segmenter, and the loss is L1 + lambda * MSE (eq. 6) by hand."""
    config = configuration_manager(2, patch=[16, 16])
    config.configuration["diffusion"].update(copy.deepcopy(trainer_cls.diffusion_settings()))
    assert config.configuration["diffusion"]["textdiffseg"]["eps_loss_weight"] == weight
    stored = trainer_cls.stored_settings(config)
    net = trainer_cls.build_network_architecture(None, config, 1, 3, False)
    assert net.regression_weight == weight
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    labels = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    labels[:, :, 4:10, 3:12] = 1
    torch.manual_seed(0)
    result = net.train()(torch.randn(2, 1, 16, 16), labels_to_x0(labels, 3))
    mse = torch.mean((result.output.float() - result.regression_target.float()) ** 2)
    l1 = loss_fn(result.reconstruction_logits(), labels) + loss_fn(result.denoised_logits(), labels)
    assert torch.allclose(result.loss(labels, loss_fn), l1 + weight * mse, rtol=1e-5)
    assert stored["textdiffseg"]["eps_loss_weight"] == weight


def test_both_segmentation_terms_decode_in_one_call_with_the_two_calls_loss_and_gradients(configuration_manager):
    """The default's two decoder inputs (the denoised latent, the encoded ground truth) go through the label decoder
    as one batch of 2B: one call, and the loss and every gradient those of two separate calls (InstanceNorm is per
    sample), against a reference pass of the same draw decoded twice by hand."""
    config = configuration_manager(2, patch=[16, 16])
    config.configuration["diffusion"].update(copy.deepcopy(nnUNetTrainerTextDiffSeg.diffusion_settings()))
    net = nnUNetTrainerTextDiffSeg.build_network_architecture(None, config, 1, 3, False).train()
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    labels = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    labels[:, :, 4:10, 3:12], labels[1, :, 11:15, 2:6] = 1, 2
    image = torch.randn(2, 1, 16, 16)
    decoder = net.denoiser.label_autoencoder.decoder
    batches = []
    hook = decoder.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))

    def pass_and_grads(decode_by_hand: bool):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        result = net(image, labels_to_x0(labels, 3))
        if decode_by_hand:
            mse = torch.mean((result.output.float() - result.regression_target.float()) ** 2)
            loss = (loss_fn(decoder(result.z0), labels) + loss_fn(decoder(result.denoised_latent()), labels)
                    + net.regression_weight * mse)
        else:
            loss = result.loss(labels, loss_fn)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    batched_loss, batched_grads = pass_and_grads(decode_by_hand=False)
    assert batches == [4]  # one decoder call on B = 2 denoised + 2 ground-truth latents
    reference_loss, reference_grads = pass_and_grads(decode_by_hand=True)
    hook.remove()
    assert batches == [4, 2, 2]
    assert torch.allclose(batched_loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert batched_grads.keys() == reference_grads.keys() and len(batched_grads) > 0
    for name, grad in batched_grads.items():
        assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-6), name


def test_a_plans_json_from_before_lambda_was_stored_keeps_lambda_1(configuration_manager):
    """Every model before the setting trained with lambda = 1: resumed with --c it keeps it."""
    config = configuration_manager(2)
    block = copy.deepcopy(nnUNetTrainerTextDiffSeg.diffusion_settings())
    del block["textdiffseg"]["eps_loss_weight"]
    config.configuration["diffusion"].update(block)
    stored = nnUNetTrainerTextDiffSeg.stored_settings(config)
    segmenter = nnUNetTrainerTextDiffSeg.build_segmenter(
        torch.nn.Identity(), nnUNetTrainerTextDiffSeg.training_schedule(stored), SamplerSettings(), stored)
    assert segmenter.regression_weight == 1.0


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerTextDiffSeg, nnUNetTrainerTextDiffSeg_x0,
                                         nnUNetTrainerTextDiffSeg_noReconstructionLoss,
                                         nnUNetTrainerTextDiffSeg_pretrainedLabelAE],
                         ids=lambda cls: cls.__name__)
def test_every_trainable_parameter_gets_a_gradient(trainer_cls, configuration_manager, monkeypatch):
    """The real network, one training pass with the trainer's loss: no trainable parameter without a gradient
    (DDP would hang), and the segmentation term alone reaches the denoiser UNet."""
    config = configuration_manager(2, patch=[16, 16])
    config.configuration["diffusion"].update(copy.deepcopy(trainer_cls.diffusion_settings()))
    torch.manual_seed(0)
    net = trainer_cls.build_network_architecture(None, config, 1, 3, False)
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    labels = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    labels[:, :, 4:10, 3:12] = 1
    labels[:, :, 8:12, 8:14] = 2
    # t below 500 (1 / sqrt(abar) < 4): the clip leaves the x0 estimate differentiable almost everywhere
    from nnunet_diffusion.architectures.textdiffseg import segmenter as latent_segmenter
    monkeypatch.setattr(latent_segmenter, "sample_timesteps", lambda b, n, device: torch.tensor([100, 400]))
    result = net.train()(torch.randn(2, 1, 16, 16), labels_to_x0(labels, 3))
    result.loss(labels, loss_fn).backward()
    missing = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    net.zero_grad(set_to_none=True)
    net.regression_weight = 0.0  # the segmentation term only
    result = net(torch.randn(2, 1, 16, 16), labels_to_x0(labels, 3))
    result.loss(labels, loss_fn).backward()
    unet_grad = sum(float(p.grad.abs().sum()) for p in net.denoiser.unet.parameters() if p.grad is not None)
    assert unet_grad > 0


@pytest.mark.parametrize("trainer_cls, name", [(nnUNetTrainerTextDiffSeg_sampledTimesteps, "linear"),
                                               (nnUNetTrainerTextDiffSeg_scaledLinear_sampledTimesteps,
                                                "scaled_linear")])
def test_sampled_timesteps_train_on_the_ddim_steps_of_the_full_schedule(trainer_cls, name, configuration_manager,
                                                                        monkeypatch):
    """The training schedule is the 1000-step one respaced to the sampler's 10 steps: index k is timestep 111 k
    with the full schedule's alpha_bar there; a draw of index k noises with that alpha_bar and conditions the
    denoiser on 111 k; the default sampler walks exactly these steps."""
    from nnunet_diffusion.diffusion.schedules import make_schedule
    from nnunet_diffusion.diffusion.samplers import sampling_schedule
    stored = trainer_cls.diffusion_settings()
    schedule = trainer_cls.training_schedule(stored)
    full = make_schedule(name, 1000)
    assert schedule.timesteps.tolist() == [111 * k for k in range(10)]
    torch.testing.assert_close(schedule.alphas_cumprod, full.alphas_cumprod[schedule.timesteps])
    sampler = trainer_cls.sampler_from(stored, apply_env=False)
    assert sampling_schedule(schedule, sampler).timesteps.equal(schedule.timesteps)

    seen = {}

    class RecordingDenoiser(torch.nn.Module):
        latent_channels = 1

        def encode_labels(self, onehot):
            return torch.ones(onehot.shape[0], 1, 2, 2)

        def encode_image(self, image):
            return None

        def forward(self, z_t, t, condition):
            seen["z_t"], seen["t"] = z_t, t
            return torch.zeros_like(z_t)

    from nnunet_diffusion.architectures.textdiffseg import segmenter as latent_segmenter
    def draw(batch, num_steps, device):
        seen["num_steps"] = num_steps
        return torch.tensor([9, 3])

    monkeypatch.setattr(latent_segmenter, "sample_timesteps", draw)
    monkeypatch.setattr(torch, "randn_like", lambda x: torch.zeros_like(x))  # z_t = sqrt(abar) z0
    segmenter = trainer_cls.build_segmenter(RecordingDenoiser(), schedule, sampler, stored)
    segmenter.training_pass(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8))
    assert seen["num_steps"] == 10 and seen["t"].tolist() == [999, 333]
    assert seen["z_t"][:, 0, 0, 0].tolist() == pytest.approx([full.alphas_cumprod[999].item() ** 0.5,
                                                                full.alphas_cumprod[333].item() ** 0.5])
    assert nnUNetTrainerTextDiffSeg_scaledLinear.diffusion_settings()["noise_schedule"] == "scaled_linear"


@pytest.mark.parametrize("trainer_cls, features, drop_key", [(nnUNetTrainerTextDiffSeg, (16, 32), False),
                                                             (nnUNetTrainerTextDiffSeg_labelFeatures8, (8, 16), False),
                                                             (nnUNetTrainerTextDiffSeg, (16, 32), True)],
                         ids=["default", "labelFeatures8", "plans_json_before_the_setting"])
def test_label_autoencoder_channels_are_stored_and_build_it(trainer_cls, features, drop_key, configuration_manager):
    """label_autoencoder_features is stored in plans.json and sets the label encoder's and decoder's channels (stem,
    one stage per latent downsampling); a plans.json without it builds the 16 / 32 every older model had."""
    config = configuration_manager(2, features=(4, 8, 8), patch=[16, 16])  # 3 stages: two latent downsamplings
    block = copy.deepcopy(trainer_cls.diffusion_settings())
    assert block["textdiffseg"]["label_autoencoder_features"] == list(features)
    if drop_key:
        del block["textdiffseg"]["label_autoencoder_features"]
    config.configuration["diffusion"].update(block)
    net = trainer_cls.build_network_architecture(None, config, 1, 3, False)
    autoencoder = net.denoiser.label_autoencoder
    encoder_channels = [b.conv2.conv.out_channels for b in autoencoder.encoder.blocks]
    decoder_channels = [autoencoder.decoder.stem.conv2.conv.out_channels,
                        *[b.conv2.conv.out_channels for b in autoencoder.decoder.blocks]]
    assert encoder_channels == [features[0], *features]  # the stride-1 stem, then the two latent downsamplings
    assert decoder_channels == [features[-1], features[1], features[0]]  # coarse to fine
