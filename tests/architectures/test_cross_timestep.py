import math

import pytest
import torch
from torch import nn

from nnunet_diffusion.architectures.apds import apds_prior_weight
from nnunet_diffusion.architectures.fft_tlstm import FFTTLSTM
from nnunet_diffusion.architectures.tlstm import ConvTLSTMCell, LinearTGRUCell
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers import variants_cross_timestep as variants
from nnunet_diffusion.trainers.cross_timestep import nnUNetTrainerCrossTimestep

C = 3


def test_apds_weight_at_start_middle_end():
    t = torch.tensor([0, 500, 1000])
    w = apds_prior_weight(t, 1000, alpha=0.8)
    assert w[0].item() == 0
    assert w[1].item() == pytest.approx(0.8 * math.exp(-2.5) * (1 - math.exp(-5)), rel=1e-6)
    assert w[2].item() == pytest.approx(0.8 * (1 - math.exp(-10)), rel=1e-6)


def test_conv_tlstm_cell_matches_equations_by_hand():
    torch.manual_seed(0)
    cell = ConvTLSTMCell(2, 3, nn.Conv1d, kernel_size=1, time_embed_dim=4)
    nn.init.normal_(cell.time.linear.weight)
    x, h, c, emb = torch.randn(1, 2, 5), torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.randn(1, 4)
    scale, shift = cell.time.linear(emb).chunk(2, 1)
    h_mod = h * (1 + scale[..., None]) + shift[..., None]
    wx, bx, wh = cell.conv_x.weight[..., 0], cell.conv_x.bias, cell.conv_h.weight[..., 0]
    pre = torch.einsum("oi,bis->bos", wx, x) + bx[None, :, None] + torch.einsum("oi,bis->bos", wh, h_mod)
    i, f, o, g = pre.chunk(4, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)          # eq. 28
    h_new = torch.sigmoid(o) * torch.tanh(c_new)                              # eq. 29
    out, (h_out, c_out) = cell(x, (h, c), emb)
    torch.testing.assert_close(c_out, c_new)
    torch.testing.assert_close(h_out, h_new)


def test_linear_tgru_cell_matches_equations_by_hand():
    torch.manual_seed(1)
    cell = LinearTGRUCell(4, 3, time_embed_dim=None)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    xr, xz, xh = cell.linear_x(x).chunk(3, 1)
    hr, hz = cell.linear_h_gates(h).chunk(2, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)                      # eqs. 30-31
    candidate = torch.tanh(xh + cell.linear_h_candidate(r * h))                # eq. 32
    expected = (1 - z) * h + z * candidate                                     # eq. 33
    torch.testing.assert_close(cell(x, h)[0], expected)


@pytest.mark.parametrize("dim", [2, 3])
def test_fft_path_is_real_and_shape_preserving(dim):
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    block = FFTTLSTM(3, 1, conv, time_embed_dim=8)
    x, image = torch.randn(2, 3, *[7] * dim), torch.randn(2, 1, *[7] * dim)
    out = block(x, block.condition_spectrum(image), torch.randn(2, 8), {})
    assert out.shape == x.shape and out.dtype == torch.float32 and not out.is_complex()
    assert (out - x).abs().max() > 0                     # it does filter
    nn.init.zeros_(block.out.weight)
    nn.init.zeros_(block.out.bias)
    torch.testing.assert_close(block(x, block.condition_spectrum(image), torch.randn(2, 8), {}), x)  # residual


def build(trainer_cls, configuration_manager, dim=3):
    torch.manual_seed(0)
    return trainer_cls.build_network_architecture(None, configuration_manager(dim, features=(4, 8, 16)), 1, C)


def run_steps(net, image, x_t, steps):
    """Denoiser outputs for consecutive steps with one condition (state carried) -> list of eps."""
    condition = net.denoiser.encode_image(image)
    return [net.denoiser(x_t, torch.full((image.shape[0],), t), condition) for t in steps]


def test_carrying_state_changes_the_output_and_reset_does_not(configuration_manager):
    image, x_t = torch.randn(1, 1, 16, 16, 16), torch.randn(1, C, 16, 16, 16)
    net = build(nnUNetTrainerCrossTimestep, configuration_manager).eval()
    with torch.no_grad():
        carried = run_steps(net, image, x_t, [999, 888])[1]
        fresh = run_steps(net, image, x_t, [888])[0]
    assert (carried - fresh).abs().max() > 1e-5
    stateless = build(variants.nnUNetTrainerCrossTimestep_noTLSTM, configuration_manager).eval()
    with torch.no_grad():
        torch.testing.assert_close(run_steps(stateless, image, x_t, [999, 888])[1],
                                   run_steps(stateless, image, x_t, [888])[0])


def test_state_is_per_sample(configuration_manager):
    net = build(nnUNetTrainerCrossTimestep, configuration_manager).eval()
    image, x_t = torch.randn(2, 1, 16, 16, 16), torch.randn(2, C, 16, 16, 16)
    other_image, other_x = image.clone(), x_t.clone()
    other_image[1], other_x[1] = torch.randn(1, 16, 16, 16), torch.randn(C, 16, 16, 16)
    with torch.no_grad():
        a = run_steps(net, image, x_t, [999, 888, 777])
        b = run_steps(net, other_image, other_x, [999, 888, 777])
    torch.testing.assert_close(a[2][0], b[2][0], rtol=1e-5, atol=1e-6)   # element 0 unaffected by element 1
    assert (a[2][1] - b[2][1]).abs().max() > 1e-5


def test_sampling_resets_state_per_patch(configuration_manager):
    net = build(nnUNetTrainerCrossTimestep, configuration_manager).eval()
    net.set_sampler(SamplerSettings(kind="ddim", steps=4))
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(image), net(image), rtol=0, atol=0)


def test_training_unrolls_a_chain_with_gradient_through_it(configuration_manager):
    net = build(nnUNetTrainerCrossTimestep, configuration_manager).train()
    net.set_sampler(SamplerSettings(kind="ddim", steps=10))
    seen = []
    net.denoiser.register_forward_hook(lambda m, i, o: seen.append((i[0], i[1].tolist())))
    labels = torch.randint(0, C, (2, 1, 16, 16, 16))
    result = net(torch.randn(2, 1, 16, 16, 16), labels_to_x0(labels, C))
    assert len(seen) == net.unroll_steps == 2
    t0, t1 = seen[0][1], seen[1][1]
    assert len(set(t0)) == len(set(t1)) == 1          # one chain for the whole batch
    assert t0[0] - t1[0] == 111                       # consecutive steps of the 10-step schedule
    assert seen[1][0].requires_grad                  # the second step's input depends on the first prediction
    assert result.output.shape == result.regression_target.shape == (4, C, 16, 16, 16)
    assert result.prior_logits.shape == (2, C, 16, 16, 16)
    loss = ((result.output - result.regression_target) ** 2).mean() + result.prior_logits.logsumexp(1).mean()
    loss.backward()
    assert net.denoiser.prior_decoder.decoder.seg_layers[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", ["nnUNetTrainerCrossTimestep"] + variants.__all__)
def test_every_variant_trains_a_step_and_samples(name, dim, configuration_manager):
    trainer_cls = getattr(variants, name, nnUNetTrainerCrossTimestep)
    net = build(trainer_cls, configuration_manager, dim)
    labels = torch.randint(0, C, (2, 1, *[16] * dim))
    result = net.train()(torch.randn(2, 1, *[16] * dim), labels_to_x0(labels, C))
    ((result.output - result.regression_target) ** 2).mean().backward()
    with torch.no_grad():
        probabilities = torch.softmax(net.eval()(torch.randn(1, 1, *[16] * dim)), 1)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, *[16] * dim))
    assert (result.prior_logits is None) == (name == "nnUNetTrainerCrossTimestep_noAPDS")
