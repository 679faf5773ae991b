import dataclasses
import math

import pytest
import torch
from torch import nn

from nnunet_diffusion.architectures.cross_timestep.apds import PriorFusion, apds_prior_weight
from nnunet_diffusion.architectures.cross_timestep.network import DEEP_CACHE
from nnunet_diffusion.architectures.cross_timestep.fft_tlstm import FFTTLSTM
from nnunet_diffusion.architectures.cross_timestep.tlstm import ConvTLSTMCell, LinearTGRUCell
from nnunet_diffusion.diffusion.objectives import MIN_SNR_GAMMA, min_snr_eps_weight
from nnunet_diffusion.diffusion.gaussian import eps_from_x0, x0_from_eps
from nnunet_diffusion.diffusion.masks import labels_to_x0
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.diffusion.schedules import make_schedule, respace
from nnunet_diffusion.trainers.cross_timestep import variants
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep

C = 3


def _loss(result, labels):
    """A loss that reaches every trained parameter: the pass's own (x0 chains: CE per step + prior) or the eps MSE."""
    if hasattr(result, "loss"):
        return result.loss(labels, lambda logits, y: torch.nn.functional.cross_entropy(logits.float(), y[:, 0].long()))
    prior = 0 if result.prior_logits is None else result.prior_logits.logsumexp(1).mean()
    return ((result.output - result.regression_target) ** 2).mean() + prior


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


def build(trainer_cls, configuration_manager, dim=3, chain_steps=None):
    """The network nnU-Net builds; chain_steps: as if trained (and stored) with that training chain."""
    torch.manual_seed(0)
    extra = None
    if chain_steps is not None:
        chain = SamplerSettings("ddim", chain_steps)
        extra = {"diffusion": {**trainer_cls.diffusion_settings(), "sampler": chain.to_dict(),
                               "training_chain": {"kind": chain.kind, "steps": chain.steps}}}
    return trainer_cls.build_network_architecture(None, configuration_manager(dim, features=(4, 8, 16), extra=extra),
                                                  1, C)


def run_steps(net, image, x_t, steps):
    """Denoiser outputs for consecutive steps with one condition (state carried) -> list of eps."""
    condition = net.denoiser.encode_image(image)
    return [net.denoiser(x_t, torch.full((image.shape[0],), t), condition) for t in steps]


def random_start(trainer_cls):
    """``trainer_cls`` with the tLSTM blocks' output projections random, as after some training: at the identity
    start (the default) they ignore their state until the first steps have moved them."""
    return type(f"{trainer_cls.__name__}_random", (trainer_cls,),
                {"options": dataclasses.replace(trainer_cls.options, identity_start=False)})


def test_carrying_state_changes_the_output_and_reset_does_not(configuration_manager):
    image, x_t = torch.randn(1, 1, 16, 16, 16), torch.randn(1, C, 16, 16, 16)
    net = build(random_start(nnUNetTrainerCrossTimestep), configuration_manager).eval()
    with torch.no_grad():
        carried = run_steps(net, image, x_t, [999, 888])[1]
        fresh = run_steps(net, image, x_t, [888])[0]
    assert (carried - fresh).abs().max() > 1e-5
    stateless = build(random_start(variants.nnUNetTrainerCrossTimestep_noTLSTM), configuration_manager).eval()
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
    net = build(nnUNetTrainerCrossTimestep, configuration_manager, chain_steps=4).eval()
    assert net.sampler.steps == 4
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(image), net(image), rtol=0, atol=0)


def test_training_unrolls_the_stored_chain_whatever_the_sampler(configuration_manager):
    net = build(variants.nnUNetTrainerCrossTimestep_eps, configuration_manager).train()
    net.set_sampler(SamplerSettings(kind="ddpm", steps=10, seed=3))    # prediction settings: not the training chain
    assert net.training_chain == SamplerSettings("ddim", 10)
    with pytest.raises(ValueError, match=r"10-step chain.*Valid NNUNET_DIFFUSION_STEPS for this model: \[10\]"):
        net.set_sampler(SamplerSettings(kind="ddim", steps=4))
    seen = []
    net.denoiser.register_forward_hook(lambda m, i, o: seen.append((i[0], i[1].tolist())))
    labels = torch.randint(0, C, (2, 1, 16, 16, 16))
    result = net(torch.randn(2, 1, 16, 16, 16), labels_to_x0(labels, C))
    assert len(seen) == net.unroll_steps == 2
    t0, t1 = seen[0][1], seen[1][1]
    assert len(set(t0)) == len(set(t1)) == 1          # one chain for the whole batch
    assert t0[0] - t1[0] == 111                       # consecutive steps of the 10-step schedule
    assert not seen[1][0].requires_grad              # 'state' scheme: x_k is a constant input
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
    _loss(result, labels).backward()
    with torch.no_grad():
        probabilities = torch.softmax(net.eval()(torch.randn(1, 1, *[16] * dim)), 1)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, *[16] * dim))
    assert (result.prior_logits is None) == (name == "nnUNetTrainerCrossTimestep_noAPDS")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _chain(net, start=5, length=2):
    """Unroll a training chain from a leaf x_start; returns (x_start, outputs, targets, state after step 1)."""
    torch.manual_seed(1)
    image, labels = torch.randn(1, 1, 16, 16, 16), torch.randint(0, C, (1, 1, 16, 16, 16))
    condition = net.denoiser.encode_image(image)
    x_start = torch.randn(1, C, 16, 16, 16, requires_grad=True)
    states = []
    net.denoiser.register_forward_hook(lambda m, i, o: states.append(_tensors(list(i[2].state.values()))))
    outputs, targets, _ = net.unroll_chain(condition, x_start, labels_to_x0(labels, C), start, length)
    return x_start, outputs, targets, states[0]


@pytest.mark.parametrize("name", ["nnUNetTrainerCrossTimestep", "nnUNetTrainerCrossTimestep_eps"])
def test_state_scheme_step_two_learns_through_the_state_only(name, configuration_manager):
    net = build(random_start(getattr(variants, name, nnUNetTrainerCrossTimestep)), configuration_manager).train()
    assert net.chain_gradient == "state"
    x_start, outputs, targets, state_after_step_1 = _chain(net)
    if targets is None:                                       # x0: any loss of step 2's logits
        loss_2 = (outputs[1] * torch.randn_like(outputs[1])).mean()
    else:
        assert not any(t.requires_grad for t in targets)      # eps targets of constant x_k: constants
        loss_2 = ((outputs[1] - targets[1]) ** 2).mean()
    # nothing of step 2's loss flows back through x: not into x_start, not into step 1's eps output
    assert torch.autograd.grad(loss_2, [x_start, outputs[0]], allow_unused=True, retain_graph=True) == (None, None)
    # ... but it does through the recurrent state step 1 left behind
    grads = torch.autograd.grad(loss_2, [t for t in state_after_step_1 if t.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_full_scheme_backpropagates_through_x_as_well(configuration_manager):
    net = build(variants.nnUNetTrainerCrossTimestep_fullChainGradient, configuration_manager).train()
    assert net.chain_gradient == "full" and net.prediction == "x0"
    x_start, outputs, targets, _ = _chain(net)
    loss_2 = (outputs[1] * torch.randn_like(outputs[1])).mean()
    grads = torch.autograd.grad(loss_2, [x_start, outputs[0]], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


class _StatelessEps(variants.nnUNetTrainerCrossTimestep_eps):
    options = variants.nnUNetTrainerCrossTimestep_noTLSTM.options


def test_stateless_two_step_chain_equals_two_independent_one_step_losses(configuration_manager):
    net = build(_StatelessEps, configuration_manager).train()
    seen = []
    hook = net.denoiser.register_forward_hook(lambda m, i, o: seen.append((i[0].detach().clone(), i[1].clone())))
    torch.manual_seed(2)
    image, labels = torch.randn(2, 1, 16, 16, 16), torch.randint(0, C, (2, 1, 16, 16, 16))
    x0 = labels_to_x0(labels, C)
    result = net(image, x0)
    hook.remove()
    assert len(seen) == 2
    chain_loss = ((result.output - result.regression_target) ** 2).mean()
    one_step = []
    for x_k, t_k in seen:   # each step alone: fresh condition, its own eps target, its Min-SNR weight
        k = int((net.chain_schedule.timesteps == t_k[0]).nonzero())
        eps = net.denoiser(x_k, t_k, net.denoiser.encode_image(image))
        weight = min_snr_eps_weight(net.chain_schedule, k)
        one_step.append(weight * ((eps - eps_from_x0(net.chain_schedule, x_k, torch.full((2,), k), x0)) ** 2).mean())
    independent_loss = (one_step[0] + one_step[1]) / 2          # equal sizes: the mean over both steps
    torch.testing.assert_close(chain_loss, independent_loss)
    params = [p for p in net.parameters()]
    chain_grads = torch.autograd.grad(chain_loss, params, allow_unused=True)
    independent_grads = torch.autograd.grad(independent_loss, params, allow_unused=True)
    for a, b in zip(chain_grads, independent_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reverse_attention_and_prior_fusion_by_hand():
    fusion = PriorFusion(2, nn.Conv1d, None, None, None, None)
    assert fusion.ra == "reverse_attention" and list(fusion.parameters()) == []
    x = torch.tensor([[[2.0], [-1.0]], [[2.0], [-1.0]]])                 # (B=2, C=2, S=1)
    prior = torch.tensor([[[0.0], [math.log(3)]], [[0.0], [math.log(3)]]])  # sigmoid: 0.5, 0.75
    torch.testing.assert_close(fusion.refined(x, prior)[0, :, 0], torch.tensor([1.0, -0.25]))   # F (1 - sig(P))
    fused = fusion(x, prior, torch.tensor([0.25, 1.0]))                  # w_t per batch element
    torch.testing.assert_close(fused[0, :, 0], torch.tensor([0.75 * 1.0, 0.75 * -0.25 + 0.25 * math.log(3)]))
    torch.testing.assert_close(fused[1], prior[1])                       # w = 1: the prior alone
    residual = PriorFusion(2, nn.Conv1d, None, None, None, None, ra="residual_reverse_attention")
    assert list(residual.parameters()) == []
    torch.testing.assert_close(residual.refined(x, prior)[0, :, 0], torch.tensor([2.0 + 1.0, -1.0 - 0.25]))  # F + RA
    conv = PriorFusion(2, nn.Conv1d, None, None, nn.LeakyReLU, None, ra="conv")
    assert sum(p.numel() for p in conv.parameters()) > 0
    with pytest.raises(ValueError, match="Unknown RA block 'gate'"):
        PriorFusion(2, nn.Conv1d, None, None, None, None, ra="gate")


def test_checkpoint_of_the_other_ra_block_is_refused_naming_the_variant(configuration_manager):
    default = build(nnUNetTrainerCrossTimestep, configuration_manager)
    conv = build(variants.nnUNetTrainerCrossTimestep_convRA, configuration_manager)
    old = conv.state_dict()
    assert any(".fusions.0.refine." in k for k in old) and not any(".fusions." in k for k in default.state_dict())
    with pytest.raises(RuntimeError, match="(?s)conv RA block.*nnUNetTrainerCrossTimestep_convRA.*Unexpected key"):
        default.load_state_dict(old)
    default.load_state_dict(old, strict=False)                           # explicitly partial loads still work
    with pytest.raises(RuntimeError, match="no weights for the conv RA block.*parameter-free reverse attention"):
        conv.load_state_dict(default.state_dict())
    build(variants.nnUNetTrainerCrossTimestep_convRA, configuration_manager).load_state_dict(old)


def test_min_snr_weight_by_hand():
    chain = respace(make_schedule("linear", 1000), 10)
    abar = chain.alphas_cumprod
    for k in range(10):
        snr = float(abar[k] / (1 - abar[k]))
        expected = 1.0 if snr <= MIN_SNR_GAMMA else MIN_SNR_GAMMA / snr
        assert float(min_snr_eps_weight(chain, k)) == pytest.approx(expected, rel=1e-6)
    assert float(min_snr_eps_weight(chain, 9)) == 1.0             # t = 999: SNR ~4e-5, plain eps loss
    assert float(min_snr_eps_weight(chain, 0)) == pytest.approx(5 * 1e-4 / 0.9999, rel=1e-3)  # t = 0: SNR ~1e4


def test_last_chain_step_loss_is_gamma_times_its_x0_error(configuration_manager):
    """A chain ending at t = 0: the eps target of a model-made x_0 is 100x that step's x0 error; weighted, the
    step's loss is exactly gamma times the squared x0 error (not 1e4 times)."""
    net = build(variants.nnUNetTrainerCrossTimestep_eps, configuration_manager).train()
    seen = []
    net.denoiser.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    torch.manual_seed(1)
    image, labels = torch.randn(1, 1, 16, 16, 16), torch.randint(0, C, (1, 1, 16, 16, 16))
    x0 = labels_to_x0(labels, C)
    original_randint = torch.randint
    try:  # pin the random start of the chain to k = 1
        torch.randint = lambda *args, **kw: torch.tensor(1) if args[-1] == () else original_randint(*args, **kw)
        result = net(image, x0)
    finally:
        torch.randint = original_randint
    x_last, index = seen[-1], torch.zeros(1, dtype=torch.long)
    w = min_snr_eps_weight(net.chain_schedule, 0).sqrt()
    eps_hat, target = result.output[1:] / w, result.regression_target[1:] / w   # step 2 of the chain: t = 0
    x0_error = ((x0_from_eps(net.chain_schedule, x_last, index, eps_hat) - x0) ** 2).mean()
    weighted = ((result.output[1:] - result.regression_target[1:]) ** 2).mean()
    torch.testing.assert_close(weighted, MIN_SNR_GAMMA * x0_error, rtol=1e-3, atol=1e-6)
    assert ((eps_hat - target) ** 2).mean() > 1000 * weighted  # what the unweighted loss would have been


@pytest.mark.parametrize("name", ["nnUNetTrainerCrossTimestep", "nnUNetTrainerCrossTimestep_fullChainGradient",
                                  "nnUNetTrainerCrossTimestep_eps"])
def test_activation_checkpointing_gives_the_plain_loss_and_gradients(name, configuration_manager):
    """Checkpointed stages are recomputed in backward with the recurrent state they saw in the forward pass:
    the unrolled chain's loss and every gradient equal those of the plain network."""
    trainer_cls = getattr(variants, name, nnUNetTrainerCrossTimestep)
    assert trainer_cls.activation_checkpointing == "cuda"  # on when training on CUDA
    image, labels = torch.randn(2, 1, 16, 16, 16), torch.randint(0, C, (2, 1, 16, 16, 16))
    grads = {}
    for checkpointed, levels in ((False, None), (True, None), (True, 1)):
        net = build(trainer_cls, configuration_manager).train()
        net.denoiser.checkpoint_activations, net.denoiser.checkpoint_levels = checkpointed, levels
        torch.manual_seed(5)  # same t and noise for all
        result = net(image, labels_to_x0(labels, C))
        loss = _loss(result, labels)
        loss.backward()
        grads[checkpointed, levels] = (loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()})
    plain_loss, plain = grads.pop((False, None))
    for loss, grad in grads.values():
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
        assert grad.keys() == plain.keys()
        for name_, g in plain.items():
            torch.testing.assert_close(grad[name_], g, rtol=1e-5, atol=1e-7, msg=name_)


@pytest.mark.parametrize("levels, expected", [
    (None, [("image", 0), ("image", 1), ("image", 2), ("stage", 0), ("stage", 1), ("step", None),
            ("encoder_block", 0), ("encoder_block", 1), ("encoder_block", 2), ("decoder_block", 0),
            ("decoder_block", 1)]),
    (2, [("image", 0), ("image", 1), ("stage", 0), ("stage", 1), ("step", None), ("encoder_block", 0),
         ("encoder_block", 1), ("decoder_block", 0), ("decoder_block", 1)]),
    (1, [("image", 0), ("stage", 1), ("step", None), ("encoder_block", 0), ("decoder_block", 1)])])
def test_checkpoint_levels_checkpoint_the_finest_stages_only(levels, expected, configuration_manager, monkeypatch):
    """Three stages (levels 0-2; the two decoder stages join the level-1 and level-0 skips: s = 0 and 1). With
    ``checkpoint_levels`` = n, exactly the image-encoder, noise-encoder, prior-decoder and decoder stages below
    level n and the FFT-tLSTM (level 0) are recomputed, each once per step with gradient (the default's warm-up
    step runs without one, so it checkpoints nothing)."""
    from nnunet_diffusion.architectures import activation_checkpointing
    seen = []

    def record(function, *args, **kwargs):
        if isinstance(function, nn.Module):
            seen.append(("image", None))  # an image-encoder stage: called on a tensor, numbered below
        else:
            seen.append((function.__name__, args[0] if isinstance(args[0], int) else None))
        return function(*args)

    monkeypatch.setattr(activation_checkpointing, "checkpoint", record)
    net = build(nnUNetTrainerCrossTimestep, configuration_manager).train()
    net.denoiser.checkpoint_activations, net.denoiser.checkpoint_levels = True, levels
    image, labels = torch.randn(1, 1, 16, 16, 16), torch.randint(0, C, (1, 1, 16, 16, 16))
    with _pinned_start(3):  # a start with a chain step above it: the warm-up step runs
        net(image, labels_to_x0(labels, C))
    image_stages = [("image", level) for level in range(seen.count(("image", None)))]  # they run finest first
    others = [call for call in seen if call[0] != "image"]
    assert sorted(image_stages + others, key=str) == sorted(expected, key=str)  # a list: a repeat would fail


class _pinned_start:
    """Pin the training chain's random start step (the scalar ``torch.randint(low, high, ())``) to ``k``."""

    def __init__(self, k):
        self.k, self.original = k, torch.randint

    def __enter__(self):
        original, k = self.original, self.k
        torch.randint = lambda *args, **kw: torch.tensor(k) if args[-1] == () else original(*args, **kw)

    def __exit__(self, *exc):
        torch.randint = self.original


def _record_calls(net):
    """Every denoiser call: (x_k, t, whether the output carries a graph, number of state entries before the call)."""
    calls = []
    net.denoiser.register_forward_pre_hook(lambda m, i: calls.append([i[0].detach().clone(), int(i[1][0]), None,
                                                                     len(i[2].state)]))

    def after(m, i, o):
        calls[-1][2] = o.requires_grad
    net.denoiser.register_forward_hook(after)
    return calls


def test_mask_chain_loss_is_the_mean_dice_ce_of_each_step_plus_the_prior(configuration_manager):
    """Default: x0 logits at every unrolled step, each with nnU-Net's Dice + CE, averaged over the steps, plus the
    prior decoder's Dice + CE. Stateless blocks: each step's logits equal a fresh one-step call at its x_k, t_k."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    dice_ce = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)

    class Stateless(variants.nnUNetTrainerCrossTimestep_unroll2):
        options = variants.nnUNetTrainerCrossTimestep_noTLSTM.options
    net = build(Stateless, configuration_manager).train()
    assert net.prediction == "x0" and net.chain_start == "noised_truth"
    calls = _record_calls(net)
    torch.manual_seed(3)
    image, labels = torch.randn(2, 1, 16, 16, 16), torch.randint(0, C, (2, 1, 16, 16, 16))
    with _pinned_start(6):
        result = net(image, labels_to_x0(labels, C))
    assert len(result.step_logits) == 2
    expected = (dice_ce(result.step_logits[0], labels) + dice_ce(result.step_logits[1], labels)) / 2 \
        + dice_ce(result.prior_logits, labels)
    torch.testing.assert_close(result.loss(labels, dice_ce), expected)
    for logits, (x_k, t_k, _, _) in zip(result.step_logits, calls[-2:]):
        fresh = net.denoiser(x_k, torch.full((2,), t_k), net.denoiser.encode_image(image))
        torch.testing.assert_close(logits, fresh, rtol=1e-4, atol=1e-5)
    # the pseudo-Dice estimate is the last step's softmax mask
    torch.testing.assert_close(result.x0_hat, torch.softmax(result.step_logits[1], 1) * 2 - 1)


def test_burn_in_runs_the_chain_from_pure_noise_without_gradient_then_unrolls(configuration_manager):
    """Start pinned at k0 = 4 of the 10-step chain, 2 unrolled steps: 5 burn-in calls (t = 999 ... 555) without
    gradient, each x_k the DDIM step of the model's own previous estimate, the state carried into the gradient
    steps; then 2 calls with gradient. The default 'warm_state' (one step): the step above k0 without gradient
    from the noised truth with an empty state, then k0 with gradient and the state it left."""
    from nnunet_diffusion.diffusion.gaussian import eps_from_x0 as eps_of
    from nnunet_diffusion.diffusion.masks import x0_from_logits
    from nnunet_diffusion.diffusion.samplers import ddim_step
    net = build(variants.nnUNetTrainerCrossTimestep_burnIn, configuration_manager).train()
    calls, outputs = _record_calls(net), []
    net.denoiser.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    torch.manual_seed(4)
    image, labels = torch.randn(1, 1, 16, 16, 16), torch.randint(0, C, (1, 1, 16, 16, 16))
    with _pinned_start(4):
        net(image, labels_to_x0(labels, C))
    chain = net.chain_schedule
    assert [t for _, t, _, _ in calls] == [int(chain.timesteps[k]) for k in range(9, 2, -1)]
    assert [g for _, _, g, _ in calls] == [False] * 5 + [True] * 2        # gradient only in the unrolled steps
    assert calls[0][3] == 0 and all(n > 0 for _, _, _, n in calls[1:])   # empty state only at the first step
    assert abs(float(calls[0][0].std()) - 1) < 0.1                        # pure noise, not the noised truth
    for k, (previous, x_next) in zip(range(9, 3, -1), zip(calls, calls[1:])):
        index = torch.full((1,), k)
        x0_hat = x0_from_logits(outputs[9 - k]).clamp(-1, 1)
        expected = ddim_step(chain, previous[0], k, x0_hat, eps_of(chain, previous[0], index, x0_hat))
        torch.testing.assert_close(x_next[0], expected, rtol=1e-4, atol=1e-5)
    plain = build(nnUNetTrainerCrossTimestep, configuration_manager).train()
    calls = _record_calls(plain)
    with _pinned_start(4):
        plain(image, labels_to_x0(labels, C))
    assert [t for _, t, _, _ in calls] == [int(chain.timesteps[k]) for k in (5, 4)]
    assert [g for _, _, g, _ in calls] == [False, True]
    assert calls[0][3] == 0 and calls[1][3] > 0


def _real_image_patch(size: int = 40) -> torch.Tensor:
    """A 2D (1, 1, size, size) patch of the MNI152 template bundled in nilearn (the example data's image), z-scored."""
    import SimpleITK as sitk
    from nnunet_diffusion.planning.example_dataset import load_template
    array = sitk.GetArrayFromImage(load_template()[0]).astype("float32")
    middle = array[array.shape[0] // 2]
    rows, cols = middle.shape
    patch = torch.from_numpy(middle[rows // 2 - size // 2: rows // 2 + size // 2,
                                    cols // 2 - size // 2: cols // 2 + size // 2].copy())
    return ((patch - patch.mean()) / patch.std())[None, None]


def test_fft_gate_spreads_over_its_range_on_a_real_image_patch():
    from nnunet_diffusion.architectures.cross_timestep.fft_tlstm import spectrum_gate
    patch = _real_image_patch()
    spectrum = torch.fft.rfftn(patch, dim=(2, 3), norm="ortho")
    gate = spectrum_gate(spectrum, 2)
    linear = spectrum_gate(spectrum, 2, "linear")
    assert float(gate.max()) == pytest.approx(1.0) and float(gate.min()) >= 0
    q10, q50, q90 = torch.quantile(gate.flatten(), torch.tensor([0.1, 0.5, 0.9])).tolist()
    assert q10 < 0.3 and 0.2 < q50 < 0.8 and q90 > 0.55, (q10, q50, q90)   # spread over (0, 1)
    off_dc = linear.flatten()[1:]                                          # the first reading: ~0 off the DC
    assert float(torch.quantile(off_dc, 0.9)) < 0.1
    # by hand: 1 at the peak, 0 at 60 dB below it, linear in dB: |F| = peak / 10 -> 1 - 1/3 (to within r)
    made = torch.tensor([[[10.0, 1.0, 0.01, 0.0]]], dtype=torch.complex64)
    torch.testing.assert_close(spectrum_gate(made, 1),
                               torch.tensor([[[1.0, 1 + math.log10(0.101) / 3, 1 + math.log10(0.002) / 3, 0.0]]]),
                               rtol=1e-5, atol=1e-6)


def test_stored_options_rebuild_the_network_not_the_class(configuration_manager):
    """The options are stored with the model (plans.json): a model trained without FFT rebuilds without it under the
    default trainer class (and its FFT gate kind likewise)."""
    from dataclasses import asdict
    stored = {**nnUNetTrainerCrossTimestep.diffusion_settings(),
              "options": asdict(variants.nnUNetTrainerCrossTimestep_APDS_SC.options)}
    net = nnUNetTrainerCrossTimestep.build_network_architecture(
        None, configuration_manager(3, features=(4, 8, 16), extra={"diffusion": stored}), 1, C)
    assert not net.denoiser.options.fft and not hasattr(net.denoiser, "fft")
    assert nnUNetTrainerCrossTimestep.diffusion_settings()["options"]["fft_gate"] == "log"


def test_tlstm_blocks_start_as_the_identity_and_learn_from_the_first_step(configuration_manager):
    """identity_start (the default): at initialisation FFT-tLSTM returns x_t exactly and every SC-tLSTM scales its
    input by 0.95 ** 2 (both maps open at 0.95, whatever the input), so the network starts as its plain U-Net;
    the blocks' output layers still get a gradient in the first step. _heInit keeps the random start."""
    net = build(nnUNetTrainerCrossTimestep, configuration_manager, dim=2)
    denoiser = net.denoiser
    x_t, image = torch.randn(2, C, 16, 16), torch.randn(2, 1, 16, 16)
    condition = denoiser.encode_image(image)
    emb = denoiser.time_mlp(torch.tensor([999, 500]))
    torch.testing.assert_close(denoiser.fft(x_t, condition.spectrum, emb, {}), x_t, rtol=0, atol=1e-6)
    for block in [*denoiser.sc_encoder, *denoiser.sc_decoder]:
        features = torch.randn(2, block.channel_out.out_features, 8, 8)
        torch.testing.assert_close(block(features, emb, {}), 0.95 ** 2 * features, rtol=1e-5, atol=1e-6)
    result = net.train()(image, labels_to_x0(torch.randint(0, C, (2, 1, 16, 16)), C))
    sum(logits.float().mean() for logits in result.step_logits).backward()
    assert denoiser.fft.out.weight.grad.abs().sum() > 0
    assert all(block.channel_out.weight.grad.abs().sum() > 0 for block in denoiser.sc_encoder)
    he = build(variants.nnUNetTrainerCrossTimestep_heInit, configuration_manager, dim=2).denoiser
    assert he.fft.out.weight.abs().sum() > 0 and he.sc_encoder[0].spatial_out.weight.abs().sum() > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_sc_spatial_cell_runs_on_the_axis_summaries_and_gives_a_separable_map(dim):
    """The default 'axis' reading: one shared Conv-tLSTM on each axis summary at its own size (a line of a 2d map,
    a plane of a 3d one), never at the patch's size; M_s's logit is a sum of one term per summary, so in 2d it is
    r[i] + c[j] (every 2 x 2 minor of the logit matrix has zero alternating sum). The broadcast reading runs the
    cell at full resolution and is not separable."""
    from nnunet_diffusion.architectures.cross_timestep.sc_tlstm import SCTLSTM
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    size = (6, 7, 8)[-dim:]
    torch.manual_seed(0)
    block = SCTLSTM(16, conv, 8)
    seen = []
    block.spatial_cell.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[2:])))
    x, emb = torch.randn(2, 16, *size), torch.randn(2, 8)
    _, _, new_s = block.step(x, emb, None, None)
    expected = [tuple(1 if a == axis else n for a, n in enumerate(size)) for axis in range(dim)]
    assert seen == expected and len(new_s) == dim
    # the map, recovered from the output of a constant channel map: M_s = out / (M_c * x)
    reduced = block.reduce(x)
    logits = sum(block.spatial_out(block.spatial_cell(reduced.mean(dim=2 + a, keepdim=True), None, emb)[0])
                 for a in range(dim))
    out, _, _ = block.step(x, emb, None, None)
    m_c = out / (torch.sigmoid(logits) * x)
    torch.testing.assert_close(m_c, m_c[..., :1, :1].expand_as(m_c) if dim == 2 else m_c[..., :1, :1, :1].expand_as(m_c))
    if dim == 2:
        minor = logits[:, 0, 1:, 1:] - logits[:, 0, 1:, :1] - logits[:, 0, :1, 1:] + logits[:, 0, :1, :1]
        torch.testing.assert_close(minor, torch.zeros_like(minor), rtol=0, atol=1e-5)
        broadcast = SCTLSTM(16, conv, 8, spatial_summary="broadcast")
        seen_b = []
        broadcast.spatial_cell.register_forward_hook(lambda module, args, out: seen_b.append(tuple(args[0].shape[2:])))
        broadcast.step(x, emb, None, None)
        assert seen_b == [size]
    # the state is carried per summary: a second step from the first's state differs from a fresh one
    carried, _, _ = block.step(x, emb, None, new_s)
    assert (carried - out).abs().max() > 1e-6


def test_models_stored_before_the_axis_summary_rebuild_with_the_broadcast_cell():
    from nnunet_diffusion.architectures.cross_timestep.network import CrossTimestepOptions
    stored = CrossTimestepOptions().to_stored()
    assert stored["spatial_summary"] == "axis"
    del stored["spatial_summary"]
    assert CrossTimestepOptions.from_stored(stored).spatial_summary == "broadcast"
    assert variants.nnUNetTrainerCrossTimestep_broadcastSC.options.spatial_summary == "broadcast"


def _stage_calls(denoiser):
    """Counts of noise-encoder and decoder stage calls, by stage index, for every denoiser call after this."""
    calls = {"encoder": [], "decoder": []}
    for kind, stages in (("encoder", denoiser.noise_encoder.stages), ("decoder", denoiser.decoder.stages)):
        for s, stage in enumerate(stages):
            stage.register_forward_hook(lambda m, i, o, kind=kind, s=s: calls[kind].append(s))
    return calls


def test_deep_cache_alternates_full_and_shallow_steps(configuration_manager):
    """deep_cache_stages = 1: step 1 full, step 2 only the shallowest encoder and the last decoder stage, step 3
    full again; the cached step consumes the feature the full step left in the state."""
    net = build(variants.nnUNetTrainerCrossTimestep_deepCache, configuration_manager).eval()
    denoiser, image, x_t = net.denoiser, torch.randn(1, 1, 16, 16, 16), torch.randn(1, C, 16, 16, 16)
    calls = _stage_calls(denoiser)
    condition = denoiser.encode_image(image)
    seen = []
    with torch.no_grad():
        for t in (999, 888, 777):
            calls["encoder"].clear(), calls["decoder"].clear()
            denoiser(x_t, torch.full((1,), t), condition)
            seen.append((list(calls["encoder"]), list(calls["decoder"]), DEEP_CACHE in condition.state))
    assert seen == [([0, 1, 2], [0, 1], True), ([0], [1], False), ([0, 1, 2], [0, 1], True)]


def test_deep_cache_step_is_the_full_step_on_the_cached_deep_feature(configuration_manager):
    """The cached step equals a full step of the same network without caching whose last decoder stage is handed
    the feature the full step before computed (a pre-hook on that stage's transposed conv): only the deep part is
    reused, everything shallow (FFT-tLSTM, stage 0 with its SC-tLSTM state, the last stage, APDS) is recomputed."""
    cached_net = build(random_start(variants.nnUNetTrainerCrossTimestep_deepCache), configuration_manager).eval()
    plain = build(random_start(nnUNetTrainerCrossTimestep), configuration_manager).eval()
    plain.load_state_dict(cached_net.state_dict())
    image, x_t, x_next = torch.randn(1, 1, 16, 16, 16), torch.randn(1, C, 16, 16, 16), torch.randn(1, C, 16, 16, 16)
    with torch.no_grad():
        a, b = cached_net.denoiser.encode_image(image), plain.denoiser.encode_image(image)
        first_a = cached_net.denoiser(x_t, torch.full((1,), 999), a)
        torch.testing.assert_close(first_a, plain.denoiser(x_t, torch.full((1,), 999), b), rtol=0, atol=0)
        deep = a.state[DEEP_CACHE]
        last = len(plain.denoiser.decoder.stages) - 1
        plain.denoiser.decoder.transpconvs[last].register_forward_pre_hook(lambda m, i: (deep,))
        reference = plain.denoiser(x_next, torch.full((1,), 888), b)
        cached = cached_net.denoiser(x_next, torch.full((1,), 888), a)
        unhooked = build(random_start(nnUNetTrainerCrossTimestep), configuration_manager).eval()
        unhooked.load_state_dict(cached_net.state_dict())
        c = unhooked.denoiser.encode_image(image)
        unhooked.denoiser(x_t, torch.full((1,), 999), c)
        full = unhooked.denoiser(x_next, torch.full((1,), 888), c)
    torch.testing.assert_close(cached, reference, rtol=1e-6, atol=1e-6)
    assert (cached - full).abs().max() > 1e-4  # and it is not the full second step: the deep part was reused


def test_deep_cache_training_pair_is_full_then_cached_and_every_parameter_learns(configuration_manager):
    net = build(variants.nnUNetTrainerCrossTimestep_deepCache, configuration_manager).train()
    calls = _stage_calls(net.denoiser)
    labels = torch.randint(0, C, (2, 1, 16, 16, 16))
    result = net(torch.randn(2, 1, 16, 16, 16), labels_to_x0(labels, C))
    assert calls["encoder"] == [0, 1, 2, 0] and calls["decoder"] == [0, 1, 1]
    _loss(result, labels).backward()
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []


def test_deep_cache_settings_are_checked_when_the_network_is_built(configuration_manager):
    for stages, message in ((3, r"deep_cache_stages must be in 0..2"), (-1, r"deep_cache_stages must be in 0..2")):
        trainer = type("T", (nnUNetTrainerCrossTimestep,),
                       {"options": dataclasses.replace(nnUNetTrainerCrossTimestep.options, deep_cache_stages=stages)})
        with pytest.raises(ValueError, match=message):
            build(trainer, configuration_manager)
    both = type("T", (variants.nnUNetTrainerCrossTimestep_deepSupervision,),
                {"options": dataclasses.replace(nnUNetTrainerCrossTimestep.options, deep_cache_stages=1)})
    with pytest.raises(ValueError, match="do not combine"):
        build(both, configuration_manager)


def test_unroll1_trains_one_step_per_draw_and_every_parameter_learns(configuration_manager):
    """``_unroll1``: one denoiser call per training draw (the state starts empty and is not carried), and still no
    parameter without a gradient (DDP). The recurrent weights on h_{t-1} see only the empty (zero) state, so their
    gradient is exactly zero: the memory across timesteps is never trained (what the docs say of the variant)."""
    # random_start: the identity start zeroes the FFT-tLSTM's output, which would zero its other gradients too
    net = build(random_start(variants.nnUNetTrainerCrossTimestep_unroll1), configuration_manager).train()
    assert net.unroll_steps == 1
    calls = _stage_calls(net.denoiser)
    labels = torch.randint(0, C, (2, 1, 16, 16, 16))
    result = net(torch.randn(2, 1, 16, 16, 16), labels_to_x0(labels, C))
    assert calls["encoder"] == [0, 1, 2] and calls["decoder"] == [0, 1]
    _loss(result, labels).backward()
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    untrained = sorted(n for n, p in net.named_parameters() if p.grad.abs().max() == 0)
    assert untrained and all(n.endswith(("conv_h.weight", "linear_h_gates.weight", "linear_h_candidate.weight"))
                             for n in untrained)
    assert any(n.startswith("denoiser.fft.") for n in untrained)


def test_warm_state_fills_the_state_one_step_above_without_gradient_and_trains_the_memory(configuration_manager):
    """``_warmState1``: x drawn one chain step above k0, that step without gradient, then k0 with it; at the
    chain's first step (t = 999) the state stays empty, as at test time. Unlike ``_unroll1``, the recurrent
    weights on h_{t-1} get a gradient (the state of a real step)."""
    net = build(random_start(variants.nnUNetTrainerCrossTimestep_warmState1), configuration_manager).train()
    chain = [int(t) for t in net.chain_schedule.timesteps]  # the respaced chain, first step first or last
    chain = sorted(chain, reverse=True)
    calls = []
    net.denoiser.register_forward_hook(
        lambda m, args, out: calls.append((int(args[1][0]), torch.is_grad_enabled())))
    labels = torch.randint(0, C, (2, 1, 16, 16, 16))
    seen, torch_seed = set(), 0
    while len(seen) < 3 and torch_seed < 200:
        torch.manual_seed(torch_seed)
        torch_seed += 1
        calls.clear()
        net.zero_grad(set_to_none=True)
        result = net(torch.randn(2, 1, 16, 16, 16), labels_to_x0(labels, C))
        if len(calls) == 1:  # k0 is the chain's first step: nothing above it to warm the state with
            assert calls == [(chain[0], True)]
            seen.add("first")
            continue
        (t_warm, grad_warm), (t_k0, grad_k0) = calls
        assert (grad_warm, grad_k0) == (False, True) and chain.index(t_warm) + 1 == chain.index(t_k0)
        seen.add("warm")
        if "gradient" not in seen:
            _loss(result, labels).backward()
            assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
            for name, p in net.named_parameters():
                if name.endswith(("conv_h.weight", "linear_h_gates.weight", "linear_h_candidate.weight")):
                    assert p.grad.abs().max() > 0, name
            seen.add("gradient")
    assert seen == {"first", "warm", "gradient"}
