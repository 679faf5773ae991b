"""DCA (UniSegDiff Sec. 2.3): dual cross-attention between condition features CF and denoising features DF.

"Two cascaded cross-attention blocks, with conditional features and noise mask features alternating as
queries." The paper gives no further detail; our reading, for 2d and 3d feature maps alike (tokens are voxels,
no positional encoding, as the features come from convolutions that already encode position):
  CF' = CF + Attn(query = LN(CF), key = value = LN(DF))     block 1: the condition looks at the noisy mask
  DF' = DF + Attn(query = LN(DF), key = value = LN(CF'))    block 2: the noisy mask looks at the updated condition
DF' goes on through DNet. Attention costs N^2 for N voxels of a stage, so DNet applies DCA only at stages with
at most ``max_tokens`` voxels (the coarse ones); a larger map is refused here rather than allocating N^2 memory.
"""
from __future__ import annotations

import torch
from torch import nn

MAX_TOKENS = 4096  # e.g. 16^3 voxels in 3d: an attention map of 4096^2 floats (64 MiB per head and patch)


def default_heads(channels: int) -> int:
    """One head per 32 channels (at least one), the usual head width of vision transformers' small models."""
    heads = max(1, channels // 32)
    while channels % heads:
        heads -= 1
    return heads


class CrossAttention(nn.Module):
    """query_map (B, F, *S) attends to context_map (B, F, *S') -> (B, F, *S): pre-norm, residual."""

    def __init__(self, channels: int, heads: int | None = None, max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.max_tokens = max_tokens
        self.norm_query = nn.LayerNorm(channels)
        self.norm_context = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads or default_heads(channels), batch_first=True)

    def forward(self, query_map: torch.Tensor, context_map: torch.Tensor) -> torch.Tensor:
        for name, x in (("query", query_map), ("context", context_map)):
            if x[0, 0].numel() > self.max_tokens:
                raise ValueError(f"cross-attention {name} map of {tuple(x.shape[2:])} = {x[0, 0].numel()} voxels "
                                 f"exceeds max_tokens={self.max_tokens} (memory grows with its square): apply "
                                 f"attention at coarser stages only")
        query = query_map.flatten(2).transpose(1, 2)      # (B, N, F)
        context = self.norm_context(context_map.flatten(2).transpose(1, 2))
        attended, _ = self.attention(self.norm_query(query), context, context, need_weights=False)
        return (query + attended).transpose(1, 2).reshape(query_map.shape)


class DualCrossAttention(nn.Module):
    """(condition CF (B, F, *S), denoising DF (B, F, *S)) -> fused denoising features (B, F, *S)."""

    def __init__(self, channels: int, heads: int | None = None, max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.condition_queries = CrossAttention(channels, heads, max_tokens)
        self.denoising_queries = CrossAttention(channels, heads, max_tokens)

    def forward(self, condition: torch.Tensor, denoising: torch.Tensor) -> torch.Tensor:
        updated_condition = self.condition_queries(condition, denoising)
        return self.denoising_queries(denoising, updated_condition)
