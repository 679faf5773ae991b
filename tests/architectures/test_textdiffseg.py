"""TextDiffSeg's networks, on values: latent statistics, the label autoencoder on the example data, eq. 2 against
a direct computation, the ablations' fixed reductions by hand, the latent sampler with a known answer, and eq. 6's
loss (on the decoded denoised latent) against a hand computation with a known denoiser."""
import contextlib
import math
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffusion.architectures.textdiffseg.image_encoder import PooledSelfAttention
from nnunet_diffusion.architectures.textdiffseg.label_autoencoder import (FixedLabelReduction, LabelAutoencoder,
                                                                          LabelDecoder, LabelEncoder, normalise_latent)
from nnunet_diffusion.architectures.textdiffseg import segmenter as latent_segmenter
from nnunet_diffusion.architectures.textdiffseg.options import TextDiffSegOptions
from nnunet_diffusion.architectures.textdiffseg.segmenter import SAMPLED_ESTIMATES, LatentDiffusionSegmenter
from nnunet_diffusion.architectures.textdiffseg.text_fusion import TextCrossAttention
from nnunet_diffusion.diffusion.gaussian import gather_coefficient
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.diffusion.schedules import make_schedule
from nnunet_diffusion.planning.example_dataset import make_case

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = dict(conv_bias=True, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
              nonlin_kwargs={"inplace": True})


def test_latent_is_normalised_per_sample_in_float32():
    z = torch.randn(3, 4, 5, 6).half() * 300 + 1000  # float16 input whose sum of squares overflows float16
    out = normalise_latent(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    encoder = LabelEncoder(3, 4, nn.Conv2d, [[3, 3]] * 2, [[2, 2], [2, 2]], **BLOCKS)
    onehot = F.one_hot(torch.randint(0, 3, (2, 16, 16)), 3).permute(0, 3, 1, 2).float()
    latent = encoder(onehot)
    assert latent.shape == (2, 4, 4, 4)
    torch.testing.assert_close(latent.flatten(1).mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(latent.flatten(1).std(1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)


def test_fixed_label_reduction_by_hand():
    """zeta_3 on a 4x4 map with 3 classes, stride 2: class fractions per 2x2 block, projected, normalised."""
    reduction = FixedLabelReduction(3, 2, nn.Conv2d, [[2, 2]])
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 0], [2, 2, 0, 2]])
    onehot = F.one_hot(labels, 3).permute(2, 0, 1)[None].float()
    fractions = torch.tensor([[[0.75, 0.0], [0.0, 0.75]], [[0.25, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.25]]])
    P = reduction.projection  # (k, N) with orthonormal rows
    torch.testing.assert_close(P @ P.T, torch.eye(2), atol=1e-6, rtol=0)
    z = torch.einsum("kn,nij->kij", P, fractions)
    expected = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + 1e-5)
    torch.testing.assert_close(reduction(onehot)[0], expected, atol=1e-5, rtol=0)


def test_label_autoencoder_reconstructs_example_labels():
    """Trained for 150 steps on axial slices of 3 example cases (5 mm), it reconstructs the slices of a 4th case
    through its 4x coarser, 4-channel latent with mean foreground Dice above 0.8."""
    rng = np.random.default_rng(0)
    volumes = [sitk.GetArrayFromImage(make_case(5.0, rng)[1]) for _ in range(4)]

    def slices(volume):
        padded = np.zeros((volume.shape[0], 40, 40), dtype=np.int64)
        h, w = min(40, volume.shape[1]), min(40, volume.shape[2])
        padded[:, :h, :w] = volume[:, :h, :w]
        return torch.from_numpy(padded[padded.reshape(len(padded), -1).max(1) > 0])

    train, test = torch.cat([slices(v) for v in volumes[:3]]), slices(volumes[3])
    onehot = lambda labels: F.one_hot(labels, 5).permute(0, 3, 1, 2).float()  # noqa: E731
    torch.manual_seed(0)
    kernels, strides = [[3, 3]] * 2, [[2, 2], [2, 2]]
    autoencoder = LabelAutoencoder(LabelEncoder(5, 4, nn.Conv2d, kernels, strides, **BLOCKS),
                                   LabelDecoder(5, 4, nn.Conv2d, kernels, strides, **BLOCKS))
    optimizer = torch.optim.AdamW(autoencoder.parameters(), 3e-3)
    for step in range(150):
        batch = train[torch.randint(0, len(train), (16,))]
        loss = F.cross_entropy(autoencoder(onehot(batch)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = autoencoder.eval()(onehot(test)).argmax(1)
    dice = [2 * ((predicted == c) & (test == c)).sum() / ((predicted == c).sum() + (test == c).sum())
            for c in range(1, 5)]
    assert float(torch.stack(dice).mean()) > 0.8, dice


def test_text_cross_attention_is_eq_2():
    """z_fused = z + out_proj(softmax(z W_q (t W_k)^T / sqrt(d_k)) t W_v), per head, computed directly."""
    torch.manual_seed(0)
    fusion = TextCrossAttention(channels=64, text_dim=12)  # 2 heads of 32 channels
    features, text = torch.randn(2, 64, 3, 4, 5), torch.randn(6, 12)
    block = fusion.attention
    z = features.flatten(2).transpose(1, 2)  # (B, 60, 64)
    q, k, v = block.to_q(z), block.to_k(text), block.to_v(text)
    heads = []
    for h in range(2):
        part = slice(32 * h, 32 * (h + 1))
        weights = torch.softmax(q[..., part] @ k[:, part].T / math.sqrt(32), dim=-1)  # (B, 60, 6)
        heads.append(weights @ v[:, part])
    expected = z + block.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(fusion(features, text), expected.transpose(1, 2).reshape(features.shape),
                               atol=1e-5, rtol=1e-5)


def test_text_cross_attention_follows_the_prompts_not_their_order():
    torch.manual_seed(0)
    fusion = TextCrossAttention(channels=32, text_dim=8)
    features, text = torch.randn(1, 32, 6, 6), torch.randn(5, 8)
    out = fusion(features, text)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(fusion(features, text[permutation]), out, atol=1e-5, rtol=1e-5)
    changed = text.clone()
    changed[2] = torch.randn(8)  # one class described differently
    assert (fusion(features, changed) - out).abs().max() > 1e-3


def test_pooled_self_attention_keeps_its_context_small():
    attention = PooledSelfAttention(32, nn.Conv3d, max_context=512)
    assert attention.context_stride((8, 8, 8)) == 1  # 512 tokens: full self-attention
    assert attention.context_stride((24, 24, 24)) == 3  # 8^3 = 512
    assert attention.context_stride((20, 56, 48)) == 5  # 4 x 12 x 10 = 480 <= 512 < 5 x 14 x 12
    x = torch.randn(1, 32, 20, 56, 48)
    out = attention(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


class OracleDenoiser(nn.Module):
    """Knows the clean latent z0 of every patch: returns the exact noise of z_t (eps = (z_t - sqrt(abar) z0) /
    sqrt(1 - abar)); decodes a latent by reading class 1 where its first channel is positive."""

    def __init__(self, z0: torch.Tensor, schedule):
        super().__init__()
        self.z0, self.schedule = z0, schedule
        self.num_classes, self.latent_channels = 2, z0.shape[1]

    def latent_shape(self, spatial):
        return tuple(s // 2 for s in spatial)

    def encode_image(self, image):
        return torch.zeros(image.shape[0], 1)

    @staticmethod
    def repeat_condition(condition, n):
        return condition.repeat_interleave(n, 0)

    def forward(self, z_t, t, condition):
        abar = gather_coefficient(self.schedule.alphas_cumprod, t.cpu(), z_t)
        z0 = self.z0.repeat_interleave(z_t.shape[0] // self.z0.shape[0], 0)
        return (z_t - abar.sqrt() * z0) / (1 - abar).sqrt()

    def decode_labels(self, z):
        up = F.interpolate(z[:, :1], scale_factor=2.0, mode="nearest")
        return torch.cat([-up, up], dim=1) * 100


def test_latent_sampler_recovers_a_known_latent_in_every_sample():
    schedule = make_schedule("linear", 1000)
    z0 = torch.randn(2, 3, 4, 4).clamp(-3, 3)
    z0 = z0.sign() * (z0.abs() + 0.5)  # away from 0, where the oracle's decoding is not saturated
    z0 = normalise_latent(z0)  # a latent the label encoder can make: the standardised estimates leave it as it is
    segmenter = LatentDiffusionSegmenter(OracleDenoiser(z0, schedule), schedule,
                                         SamplerSettings(kind="ddim", steps=10, num_samples=3),
                                         sampled_estimate="standardised")  # the oracle has no label encoder
    latents = segmenter.sample_latent(torch.zeros(2, 1, 8, 8))
    torch.testing.assert_close(latents, z0.repeat_interleave(3, 0), atol=1e-4, rtol=1e-4)
    probabilities = segmenter.member_probabilities(torch.zeros(2, 1, 8, 8))
    assert probabilities.shape == (2, 3, 2, 8, 8)
    expected = (F.interpolate(z0[:, :1], scale_factor=2.0) > 0).float()
    torch.testing.assert_close(probabilities[:, :, 1], expected.expand(2, 3, 8, 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("estimate", ["clipped", "standardised"])
def test_sampled_estimates_standardise_or_only_clip(estimate):
    """An oracle for a latent no encoder makes (mean 2, std 3): 'clipped' ends on it clipped to +-5, 'standardised'
    on its standardisation (the last step's estimate is the oracle's z0 exactly, then projected)."""
    schedule = make_schedule("linear", 1000)
    z0 = 2 + 3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    segmenter = LatentDiffusionSegmenter(OracleDenoiser(z0, schedule), schedule,
                                         SamplerSettings(kind="ddim", steps=10), sampled_estimate=estimate)
    latents = segmenter.sample_latent(torch.zeros(2, 1, 8, 8))
    flat = z0.flatten(1)
    by_hand = ((flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt())
    expected = z0.clamp(-5, 5) if estimate == "clipped" else by_hand.reshape(z0.shape).clamp(-5, 5)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


class LabelMapDenoiser(OracleDenoiser):
    """OracleDenoiser whose label encoder is known: class probabilities (p_0, p_1) of a 2x2 block -> latent
    2 p_1 - 1 (pooled) in every channel."""

    def encode_labels(self, probabilities):
        return F.avg_pool2d(probabilities[:, 1:2] * 2 - 1, 2).repeat(1, self.latent_channels, 1, 1)


def test_projected_estimates_are_the_latents_of_their_decoded_label_maps():
    """'projected': an estimate z is replaced by encode(softmax(decode(z))); with this decoder (logits -100 z, 100 z)
    and encoder (2 p_1 - 1, pooled) that is by hand tanh(100 z[:, 0]) in every channel. The last estimate is the
    model's own (with an oracle, its z0)."""
    schedule = make_schedule("linear", 1000)
    z0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    segmenter = LatentDiffusionSegmenter(LabelMapDenoiser(z0, schedule), schedule,
                                         SamplerSettings(kind="ddim", steps=10), sampled_estimate="projected")
    z = torch.tensor([[[[0.3, -2.0], [0.01, -0.004]]] * 3]).reshape(1, 3, 2, 2)
    by_hand = torch.tensor([[1.0, -1.0], [0.76159416, -0.37994896]]).expand(1, 3, 2, 2)  # tanh(1), tanh(-0.4)
    torch.testing.assert_close(segmenter.project_to_label_latent(z), by_hand)
    seen = []
    latents = segmenter.sample_latent(torch.zeros(2, 1, 8, 8), on_step=lambda k, x0: seen.append((k, x0)))
    torch.testing.assert_close(latents, z0.clamp(-5, 5), atol=1e-4, rtol=1e-4)
    # every estimate but the last was projected: the oracle's z0 read through tanh(100 z0[:, 0]), in every channel
    expected = torch.tanh(100 * z0[:, :1]).repeat(1, 3, 1, 1)
    for k, x0 in seen[:-1]:
        torch.testing.assert_close(x0, expected, atol=1e-4, rtol=0)
    assert [k for k, _ in seen] == list(range(9, -1, -1))


def test_models_stored_before_standardised_estimates_keep_the_clip():
    assert TextDiffSegOptions.from_stored({"segmentation_loss": "denoised"}).sampled_estimate == "clipped"
    assert TextDiffSegOptions().sampled_estimate == "projected"
    assert TextDiffSegOptions.from_stored({"sampled_estimate": "standardised"}).sampled_estimate == "standardised"
    with pytest.raises(ValueError, match="not one of"):
        LatentDiffusionSegmenter(nn.Identity(), make_schedule("linear", 10), SamplerSettings(steps=10),
                                 sampled_estimate="rescaled")


# ---- eq. 4-6: the segmentation loss on the decoded denoised latent ------------------------------------------------

class LinearDenoiser(nn.Module):
    """A denoiser whose output is known: ``scale * z_t + condition`` (one learnable scale; condition = the image
    pooled to the latent grid); a 1x1-conv decoder (2 classes) after nearest upsampling by 2; an encoder that is a
    fixed pooling of the one-hot."""

    def __init__(self):
        super().__init__()
        self.num_classes, self.latent_channels = 2, 2
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.decoder = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.decoder.weight.copy_(torch.tensor([[[[1.0]], [[-0.5]]], [[[-1.0]], [[0.5]]]]))
            self.decoder.bias.copy_(torch.tensor([0.1, -0.1]))

    def encode_image(self, image):
        return F.avg_pool2d(image, 2).repeat(1, 2, 1, 1)

    def encode_labels(self, onehot):
        return normalise_latent(F.avg_pool2d(onehot, 2))

    def forward(self, z_t, t, condition):
        return self.scale * z_t + condition

    def decode_labels(self, z):
        return self.decoder(F.interpolate(z, scale_factor=2.0, mode="nearest"))


def ce_and_soft_dice(logits, labels):
    """A stand-in for the trainer's CE + Dice (any differentiable segmentation loss does)."""
    probabilities = torch.softmax(logits.float(), 1)
    onehot = F.one_hot(labels[:, 0], 2).permute(0, 3, 1, 2).float()
    dice = 2 * (probabilities * onehot).sum() / (probabilities.sum() + onehot.sum())
    return F.cross_entropy(logits.float(), labels[:, 0]) + 1 - dice


def loss_case(prediction, segmentation_loss="denoised+reconstruction", denoised_latent="x0_estimate", t=None):
    """One training pass of the linear denoiser on a 2-class 8x8 case, with its draw (t, noise) redone by hand."""
    torch.manual_seed(0)
    schedule = make_schedule("linear", 1000)
    segmenter = LatentDiffusionSegmenter(LinearDenoiser(), schedule, SamplerSettings(kind="ddim", steps=10),
                                         prediction, regression_weight=0.3, segmentation_loss=segmentation_loss,
                                         denoised_latent=denoised_latent)
    image = torch.randn(2, 1, 8, 8)
    labels = (torch.randn(2, 1, 8, 8) > 0.3).long()
    x0 = F.one_hot(labels[:, 0], 2).permute(0, 3, 1, 2).float() * 2 - 1
    torch.manual_seed(1)
    with contextlib.ExitStack() as stack:
        if t is not None:  # the pass's own timestep draw, fixed
            stack.enter_context(mock.patch.object(latent_segmenter, "sample_timesteps",
                                                  lambda *args: torch.full((2,), t, dtype=torch.long)))
        result = segmenter.training_pass(image, x0)
    # the same draw by hand: t from the pass, the noise from z_t
    z0 = normalise_latent(F.avg_pool2d((x0 + 1) / 2, 2))
    abar = schedule.alphas_cumprod[result.t].float().reshape(-1, 1, 1, 1)
    noise = (result.z_t - abar.sqrt() * z0) / (1 - abar).sqrt()
    return segmenter, image, labels, z0, abar, noise, result


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_loss_is_segmentation_of_decoded_denoised_latent_plus_reconstruction_plus_weighted_mse(prediction):
    segmenter, image, labels, z0, abar, noise, result = loss_case(prediction)
    net = segmenter.denoiser
    torch.testing.assert_close(result.z_t, abar.sqrt() * z0 + (1 - abar).sqrt() * noise)
    condition = F.avg_pool2d(image, 2).repeat(1, 2, 1, 1)
    output = 0.7 * result.z_t + condition
    if prediction == "eps":
        z_dn = ((result.z_t - (1 - abar).sqrt() * output) / abar.sqrt()).clamp(-5, 5)
        mse = ((output - noise) ** 2).mean()
    else:
        z_dn = output.clamp(-5, 5)
        mse = ((output - z0) ** 2).mean()
    with torch.no_grad():
        denoised = ce_and_soft_dice(net.decode_labels(z_dn), labels)
        reconstruction = ce_and_soft_dice(net.decode_labels(z0), labels)
        loss = result.loss(labels, ce_and_soft_dice)
    assert abs(float(denoised - reconstruction)) > 1e-2  # the two terms differ: the test tells them apart
    torch.testing.assert_close(loss, denoised + reconstruction + 0.3 * mse)
    for terms, expected in [("denoised", denoised + 0.3 * mse), ("reconstruction", reconstruction + 0.3 * mse)]:
        _, _, _, _, _, _, other = loss_case(prediction, terms)
        with torch.no_grad():
            torch.testing.assert_close(other.loss(labels, ce_and_soft_dice), expected)
    # the per-epoch pseudo-Dice decodes the same denoised latent
    torch.testing.assert_close(result.x0_hat, torch.softmax(net.decode_labels(z_dn), 1) * 2 - 1)


def test_ldseg_reading_of_the_denoised_latent_is_z_t_minus_eps_hat():
    segmenter, image, labels, z0, abar, noise, result = loss_case("eps", "denoised", "z_t_minus_eps")
    output = 0.7 * result.z_t + F.avg_pool2d(image, 2).repeat(1, 2, 1, 1)
    torch.testing.assert_close(result.denoised_latent(), (result.z_t - output).clamp(-5, 5))
    mse = ((output - noise) ** 2).mean()
    with torch.no_grad():
        expected = ce_and_soft_dice(segmenter.denoiser.decode_labels((result.z_t - output).clamp(-5, 5)), labels)
        torch.testing.assert_close(result.loss(labels, ce_and_soft_dice), expected + 0.3 * mse)


@pytest.mark.parametrize("prediction, t, reading", [("eps", 200, "x0_estimate"), ("eps", 500, "x0_estimate"),
                                                     ("x0", 500, "x0_estimate"), ("eps", 500, "x0_estimate_exact")])
def test_segmentation_term_reaches_the_denoiser_through_the_denoised_latent(prediction, t, reading):
    """With lambda's MSE removed, the denoiser's scale gets a gradient from the segmentation term: the finite
    difference of segmentation_loss(decode(z_dn(scale))), for an eps model times min(1, sqrt(SNR_t)) (1 at t = 200,
    SNR 1.9; 0.29 at t = 500; 'x0_estimate_exact': the finite difference itself); the reconstruction-only loss gives
    it none. The decoder gets one from the denoised term alone."""
    segmenter, image, labels, z0, abar, noise, result = loss_case(prediction, "denoised", reading, t=t)
    segmenter.regression_weight = 0.0
    result.loss(labels, ce_and_soft_dice).backward()
    net = segmenter.denoiser
    condition = F.avg_pool2d(image, 2).repeat(1, 2, 1, 1)
    z_t = result.z_t.detach()

    def seg(scale):
        output = scale * z_t + condition
        z_dn = output if prediction == "x0" else (z_t - (1 - abar).sqrt() * output) / abar.sqrt()
        return ce_and_soft_dice(net.decode_labels(z_dn.clamp(-5, 5)), labels)

    with torch.no_grad():
        h = 1e-3
        expected = (seg(0.7 + h) - seg(0.7 - h)) / (2 * h)
    if prediction == "eps" and reading == "x0_estimate":
        snr = float(abar[0] / (1 - abar[0]))
        assert (snr > 1) == (t == 200)
        expected = expected * min(1.0, snr ** 0.5)
    assert abs(float(expected)) > 1e-3
    torch.testing.assert_close(net.scale.grad, expected, atol=1e-4, rtol=2e-3)
    assert net.decoder.weight.grad.abs().sum() > 0
    _, _, _, _, _, _, old = loss_case(prediction, "reconstruction", t=t)
    old.segmenter.regression_weight = 0.0
    old.loss(labels, ce_and_soft_dice).backward()
    assert old.segmenter.denoiser.scale.grad is None or old.segmenter.denoiser.scale.grad == 0


def test_eps_denoised_latent_is_clipped_near_t_max():
    """At t = 999, 1 / sqrt(abar) ~ 157: the x0 estimate is clipped to +-LATENT_CLIP, as the sampler clips it,
    and the loss stays finite."""
    segmenter, image, labels, z0, abar, noise, result = loss_case("eps", t=999)
    z_dn = result.denoised_latent()
    assert z_dn.abs().max() <= 5 and (z_dn.abs() == 5).any()
    loss = result.loss(labels, ce_and_soft_dice)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(segmenter.denoiser.scale.grad)


def test_unknown_segmentation_loss_settings_are_refused():
    schedule = make_schedule("linear", 1000)
    with pytest.raises(ValueError, match="'both' is not one of"):
        LatentDiffusionSegmenter(LinearDenoiser(), schedule, SamplerSettings(), segmentation_loss="both")
    with pytest.raises(ValueError, match="'z_t' is not one of"):
        LatentDiffusionSegmenter(LinearDenoiser(), schedule, SamplerSettings(), denoised_latent="z_t")


# ---- trained as sampled: the recycled latent (``training_input='recycled'``) -------------------------------------

@pytest.mark.parametrize("prediction, t", [("eps", 30), ("eps", 600), ("x0", 300)])
def test_recycled_draw_by_hand(prediction, t):
    """z_t is the model's own clipped z0 estimate from q(z0, T-1) (noise n1), noised to t (noise n2); the targets
    point at the ground truth: z0 (x0), or the noise taking z_t to z0 with Min-SNR-5 weights (eps)."""
    schedule = make_schedule("linear", 1000)
    segmenter = LatentDiffusionSegmenter(LinearDenoiser(), schedule, SamplerSettings(kind="ddim", steps=10),
                                         prediction, regression_weight=0.3, training_input="recycled")
    torch.manual_seed(0)
    image = torch.randn(2, 1, 8, 8)
    labels = (torch.randn(2, 1, 8, 8) > 0.3).long()
    x0 = F.one_hot(labels[:, 0], 2).permute(0, 3, 1, 2).float() * 2 - 1
    torch.manual_seed(1)
    with mock.patch.object(latent_segmenter, "sample_timesteps", lambda *a: torch.full((2,), t, dtype=torch.long)):
        result = segmenter.training_pass(image, x0)
    # by hand
    z0 = normalise_latent(F.avg_pool2d((x0 + 1) / 2, 2))
    condition = F.avg_pool2d(image, 2).repeat(1, 2, 1, 1)
    torch.manual_seed(1)
    n1, n2 = torch.randn(z0.shape), torch.randn(z0.shape)
    a_last, a_t = float(schedule.alphas_cumprod[999]), float(schedule.alphas_cumprod[t])
    z_last = math.sqrt(a_last) * z0 + math.sqrt(1 - a_last) * n1
    out_last = 0.7 * z_last + condition
    z_first = out_last if prediction == "x0" else (z_last - math.sqrt(1 - a_last) * out_last) / math.sqrt(a_last)
    z_t = math.sqrt(a_t) * z_first.clamp(-5, 5) + math.sqrt(1 - a_t) * n2
    torch.testing.assert_close(result.z_t, z_t)
    output = 0.7 * z_t + condition
    snr = a_t / (1 - a_t)
    if prediction == "eps":
        target = (z_t - math.sqrt(a_t) * z0) / math.sqrt(1 - a_t)
        weight = min(snr, 5.0) / snr
        z_dn = ((z_t - math.sqrt(1 - a_t) * output) / math.sqrt(a_t)).clamp(-5, 5)
    else:
        target, weight, z_dn = z0, 1.0, output.clamp(-5, 5)
    torch.testing.assert_close(result.regression_target, target)
    assert (weight < 1) == (prediction == "eps" and t == 30)  # SNR_30 ~ 15 > 5: the weight bites
    net = segmenter.denoiser
    with torch.no_grad():
        expected = (ce_and_soft_dice(net.decode_labels(z_dn), labels) + ce_and_soft_dice(net.decode_labels(z0), labels)
                    + 0.3 * weight * ((output - target) ** 2).mean())
        torch.testing.assert_close(result.loss(labels, ce_and_soft_dice), expected)


def test_recycling_a_perfect_estimate_is_the_plain_draw():
    """If the model's own estimate is exactly z0, the recycled z_t is q(z0, t) and its eps target that noise."""
    schedule = make_schedule("linear", 1000)
    segmenter = LatentDiffusionSegmenter(LinearDenoiser(), schedule, SamplerSettings(kind="ddim", steps=10),
                                         training_input="recycled")
    x0 = F.one_hot((torch.randn(2, 8, 8) > 0).long(), 2).permute(0, 3, 1, 2).float() * 2 - 1
    z0 = normalise_latent(F.avg_pool2d((x0 + 1) / 2, 2))
    image = torch.randn(2, 1, 8, 8)
    with mock.patch.object(LatentDiffusionSegmenter, "latent_x0", lambda self, z, s, c: z0), \
            mock.patch.object(latent_segmenter, "sample_timesteps", lambda *a: torch.tensor([40, 700])):
        torch.manual_seed(3)
        result = segmenter.training_pass(image, x0)
    torch.manual_seed(3)
    torch.randn(z0.shape)  # the noise of z_{T-1}, which the perfect estimate ignores
    noise = torch.randn(z0.shape)
    abar = gather_coefficient(schedule.alphas_cumprod, result.t, z0)
    torch.testing.assert_close(result.z_t, abar.sqrt() * z0 + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(result.regression_target, noise, atol=1e-4, rtol=1e-4)


def test_recycled_input_without_the_reconstruction_term_is_refused():
    with pytest.raises(ValueError, match="needs a segmentation loss with the reconstruction term.*label encoder"):
        LatentDiffusionSegmenter(LinearDenoiser(), make_schedule("linear", 1000), SamplerSettings(),
                                 segmentation_loss="denoised", training_input="recycled")
    with pytest.raises(ValueError, match="'replayed' is not one of"):
        LatentDiffusionSegmenter(LinearDenoiser(), make_schedule("linear", 1000), SamplerSettings(),
                                 training_input="replayed")
