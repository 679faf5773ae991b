"""Selective state-space layer (Mamba; DSM sec. 3.1, eqs. 3-6) that trains on CPU and GPU in plain PyTorch.

ZOH discretisation per token t (Mamba's): A_bar_t = exp(delta_t A), B_bar_t = delta_t B_t (Mamba's first-order
simplification of (delta A)^-1 (exp(delta A) - I) delta B), h_t = A_bar_t h_{t-1} + B_bar_t x_t, y_t = C_t h_t + D x_t.
The maintained pure-PyTorch implementation ``mambapy`` computes it with a parallel scan (its ``pscan``); where the
``mamba-ssm`` CUDA kernels are installed, mambapy uses them (``use_cuda``). Unlike DSM's reference code, the layer is
trained: it is called with gradients on.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn
from mambapy.mamba import Mamba, MambaConfig


def mamba_cuda_kernels_available() -> bool:
    """Whether the ``mamba-ssm`` CUDA kernels are installed (mambapy then uses them on CUDA tensors)."""
    return importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available()


class StateSpaceLayer(nn.Module):
    """(B, L, D) token sequence -> (B, L, D): one residual Mamba block (RMSNorm, gated SSM branch).

    d_state: N of the hidden state per channel; expand: inner width / D (Mamba's defaults 16 and 2).
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2):
        super().__init__()
        self.config = MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand,
                                  use_cuda=mamba_cuda_kernels_available())
        self.mamba = Mamba(self.config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # the scan's cumulative products underflow in float16: run it in float32 under autocast
        with torch.autocast(tokens.device.type, enabled=False):
            return self.mamba(tokens.float()).to(tokens.dtype)
