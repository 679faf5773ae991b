"""The selective state-space layer: mambapy's parallel scan against a hand-written sequential recurrence, and
gradients reaching every parameter (DSM's reference never trains its Mamba layer)."""
import torch

from nnunet_diffusion.architectures.dsm.ssm import StateSpaceLayer


def sequential_scan(x, delta, A, B, C, D):
    """eqs. 3-6 token by token: h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, y_t = C_t h_t + D x_t.
    x, delta (b, L, E); A (E, N); B, C (b, L, N); D (E,)."""
    b, L, E = x.shape
    h = torch.zeros(b, E, A.shape[1], dtype=x.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, dim=1)


def test_parallel_scan_equals_the_sequential_recurrence():
    torch.manual_seed(0)
    layer = StateSpaceLayer(d_model=6, d_state=4)
    block = layer.mamba.layers[0].mixer
    b, L, E, N = 2, 7, block.config.d_inner, 4  # L = 7: the parallel scan pads to a power of two
    x, delta = torch.randn(b, L, E, dtype=torch.float64), torch.rand(b, L, E, dtype=torch.float64) * 0.5
    A = -torch.rand(E, N, dtype=torch.float64) * 2
    B, C, D = (torch.randn(b, L, N, dtype=torch.float64), torch.randn(b, L, N, dtype=torch.float64),
               torch.randn(E, dtype=torch.float64))
    torch.testing.assert_close(block.selective_scan(x, delta, A, B, C, D), sequential_scan(x, delta, A, B, C, D),
                               rtol=1e-10, atol=1e-10)


def test_every_parameter_trains_and_half_precision_stays_finite():
    torch.manual_seed(0)
    layer = StateSpaceLayer(d_model=8)
    tokens = torch.randn(2, 300, 8)
    layer(tokens).square().mean().backward()
    assert [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            out = layer(tokens.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
