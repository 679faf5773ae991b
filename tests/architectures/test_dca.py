"""DCA against a hand-written attention formula, its cascade order, and its memory guard."""
import math

import pytest
import torch

from nnunet_diffusion.architectures.unisegdiff.dca import CrossAttention, DualCrossAttention, default_heads


def reference_cross_attention(block: CrossAttention, query_map, context_map):
    """softmax(Q K^T / sqrt(d)) V per head with the block's own weights, written out."""
    f = query_map.shape[1]
    heads = block.attention.num_heads
    q_tokens = query_map.flatten(2).transpose(1, 2)
    k_tokens = block.norm_context(context_map.flatten(2).transpose(1, 2))
    w, b = block.attention.in_proj_weight, block.attention.in_proj_bias
    q = block.norm_query(q_tokens) @ w[:f].T + b[:f]
    k = k_tokens @ w[f:2 * f].T + b[f:2 * f]
    v = k_tokens @ w[2 * f:].T + b[2 * f:]
    d = f // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(q.shape)
    out = out @ block.attention.out_proj.weight.T + block.attention.out_proj.bias
    return (q_tokens + out).transpose(1, 2).reshape(query_map.shape)


@pytest.mark.parametrize("shape, heads", [((2, 8, 4, 5), 1), ((1, 8, 3, 2, 4), 2)])
def test_cross_attention_equals_the_written_out_formula(shape, heads):
    torch.manual_seed(0)
    block = CrossAttention(shape[1], heads).eval()
    query, context = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(block(query, context), reference_cross_attention(block, query, context),
                                   rtol=1e-4, atol=1e-5)


def test_dual_cross_attention_cascades_condition_queries_first():
    torch.manual_seed(0)
    dca = DualCrossAttention(8, 2).eval()
    condition, denoising = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        expected = dca.denoising_queries(denoising, dca.condition_queries(condition, denoising))
        torch.testing.assert_close(dca(condition, denoising), expected)
        # the denoising features do change the result through block 1 (the condition's update)
        assert (dca(condition, denoising) - dca(condition, denoising + 1)).abs().max() > 1e-3


def test_attention_is_equivariant_to_voxel_order():
    torch.manual_seed(0)
    dca = DualCrossAttention(8).eval()
    condition, denoising = torch.randn(1, 8, 12), torch.randn(1, 8, 12)
    order = torch.randperm(12)
    with torch.no_grad():
        torch.testing.assert_close(dca(condition[..., order], denoising[..., order]),
                                   dca(condition, denoising)[..., order], rtol=1e-5, atol=1e-6)


def test_too_large_maps_are_refused_before_allocating_attention():
    with pytest.raises(ValueError, match="exceeds max_tokens=64"):
        CrossAttention(8, max_tokens=64)(torch.randn(1, 8, 4, 4, 5), torch.randn(1, 8, 4, 4, 5))


def test_default_heads_divide_the_channels():
    assert [default_heads(c) for c in (16, 32, 64, 96, 320)] == [1, 1, 2, 3, 10]
