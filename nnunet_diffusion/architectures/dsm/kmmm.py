"""k-Means Mask Mamba block (DSM sec. 4.1.1, eqs. 8-10): queries updated against one feature map.

    response  = (Q W_q)(F W_k)^T / sqrt(D)                    (B, K, P): query x voxel affinity
    response += SSM(SiLU(response))                           voxels as tokens, the K responses as channels
    assignment = one_hot(argmax over the K queries)            cluster-wise argmax (kMaX-DeepLab), not a softmax
                                                               over voxels as in MaskFormer's cross-attention
    Q <- LN(Q + W_o (assignment-weighted mean of F W_v)) ; Q <- Q + FFN(Q)

Choices where the paper is vague (docs/methods/dsm.md):
- the SSM output is added to the response (residual), so the untrained SSM does not scramble the assignment;
- the update is the *mean* of the values of a cluster's voxels (a k-means centre update), where kMaX sums them:
  a sum grows with the cluster's size and overflows float16 on a large patch;
- the argmax has no gradient: W_q, W_k and the SSM learn through the response, which the trainer supervises as
  each layer's mask logits (deep supervision, as kMaX-DeepLab supervises its cluster logits); W_v, W_o, the FFN
  through the queries.
``kmeans=False`` is Table 5's 'no kMMM' ablation: MaskFormer's spatial softmax cross-attention, no SSM.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffusion.architectures.dsm.ssm import StateSpaceLayer


def kmeans_update(response: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """response (B, K, P), values (B, P, D) -> (B, K, D): per query, the mean of the values of the voxels whose
    largest response is that query's (zero for a query no voxel chose). Computed in float32."""
    assignment = F.one_hot(response.argmax(dim=1), response.shape[1]).float()  # (B, P, K)
    sums = assignment.transpose(1, 2) @ values.float()  # (B, K, D)
    counts = assignment.sum(dim=1).unsqueeze(-1)  # (B, K, 1)
    return sums / counts.clamp_min(1.0)


def spatial_softmax_update(response: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """MaskFormer's cross-attention (eq. 8): softmax over the voxels of each query's response, then the weighted
    sum of the values. (B, K, P), (B, P, D) -> (B, K, D)."""
    return torch.softmax(response.float(), dim=-1) @ values.float()


class KMeansMaskMambaLayer(nn.Module):
    """(queries (B, K, D), features (B, D, *S)) -> (queries (B, K, D), response logits (B, K, *S))."""

    def __init__(self, dim: int, num_queries: int, kmeans: bool = True, ssm_state: int = 16):
        super().__init__()
        self.kmeans = kmeans
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ssm = StateSpaceLayer(num_queries, d_state=ssm_state) if kmeans else None
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, queries: torch.Tensor, features: torch.Tensor):
        tokens = features.flatten(2).transpose(1, 2)  # (B, P, D)
        response = self.to_q(queries) @ self.to_k(tokens).transpose(1, 2) / math.sqrt(tokens.shape[-1])
        values = self.to_v(tokens)
        if self.kmeans:
            response = response + self.ssm(F.silu(response).transpose(1, 2)).transpose(1, 2)
            update = kmeans_update(response, values)
        else:
            update = spatial_softmax_update(response, values)
        queries = self.norm(queries + self.out(update.to(queries.dtype)))
        queries = queries + self.ffn(queries)
        return queries, response.reshape(*response.shape[:2], *features.shape[2:])
