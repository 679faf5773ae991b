"""TextDiffSeg's networks, on values: latent statistics, the label autoencoder on the example data, eq. 2 against
a direct computation, the ablations' fixed reductions by hand, and the latent sampler with a known answer."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffusion.architectures.textdiffseg.image_encoder import PooledSelfAttention
from nnunet_diffusion.architectures.textdiffseg.label_autoencoder import (FixedLabelReduction, LabelAutoencoder,
                                                                          LabelDecoder, LabelEncoder, normalise_latent)
from nnunet_diffusion.architectures.textdiffseg.segmenter import LatentDiffusionSegmenter
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
    segmenter = LatentDiffusionSegmenter(OracleDenoiser(z0, schedule), schedule,
                                         SamplerSettings(kind="ddim", steps=10, num_samples=3))
    latents = segmenter.sample_latent(torch.zeros(2, 1, 8, 8))
    torch.testing.assert_close(latents, z0.repeat_interleave(3, 0), atol=1e-4, rtol=1e-4)
    probabilities = segmenter.member_probabilities(torch.zeros(2, 1, 8, 8))
    assert probabilities.shape == (2, 3, 2, 8, 8)
    expected = (F.interpolate(z0[:, :1], scale_factor=2.0) > 0).float()
    torch.testing.assert_close(probabilities[:, :, 1], expected.expand(2, 3, 8, 8), atol=1e-4, rtol=0)
