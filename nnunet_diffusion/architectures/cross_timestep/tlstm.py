"""Recurrent cells whose state is carried across reverse-diffusion timesteps (Cross-Timestep, Appendix C).

Both cells modulate the previous hidden state with the timestep embedding E_t before using it
(h'_t = h_{t-1} * (1 + scale(E_t)) + shift(E_t), a FiLM modulation: the paper says 'modulated', not how; this
is the 't-cell'). ``time_embed_dim=None`` gives the plain cell (h'_t = h_{t-1}).
A state of None means 'no history' (zeros): the first step of every patch.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
from torch import nn


class TimeModulation(nn.Module):
    """h (B, C, *S) or (B, C), E_t (B, E) -> h * (1 + scale(E_t)) + shift(E_t). Starts as the identity."""

    def __init__(self, time_embed_dim: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb).chunk(2, dim=1)
        shape = (*scale.shape, *([1] * (h.ndim - 2)))
        return h * (1 + scale.reshape(shape)) + shift.reshape(shape)


class ConvTLSTMCell(nn.Module):
    """Conv-tLSTM (eqs. 24-29): all gates are convolutions, cell and hidden states are feature maps.

    x (B, C_in, *S), state (h, c) each (B, hidden, *S) or None, emb (B, E) -> (h, (h, c)).
    ``conv_op`` picks 1D/2D/3D; kernel_size 1 without time embedding is a plain (per-voxel) LSTM.
    """

    def __init__(self, in_channels: int, hidden_channels: int, conv_op: Type[nn.Module], kernel_size: int = 3,
                 time_embed_dim: Optional[int] = None):
        super().__init__()
        self.hidden_channels = hidden_channels
        padding = kernel_size // 2
        self.conv_x = conv_op(in_channels, 4 * hidden_channels, kernel_size, padding=padding)
        self.conv_h = conv_op(hidden_channels, 4 * hidden_channels, kernel_size, padding=padding, bias=False)
        self.time = TimeModulation(time_embed_dim, hidden_channels) if time_embed_dim else None

    def forward(self, x: torch.Tensor, state: Optional[Tuple[torch.Tensor, torch.Tensor]],
                emb: Optional[torch.Tensor] = None):
        if state is None:
            zeros = x.new_zeros((x.shape[0], self.hidden_channels, *x.shape[2:]))
            state = (zeros, zeros)
        h_prev, c_prev = state
        h_mod = self.time(h_prev, emb) if self.time is not None else h_prev
        i, f, o, g = (self.conv_x(x) + self.conv_h(h_mod)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class LinearTGRUCell(nn.Module):
    """Linear-tGRU (eqs. 30-33) on vectors: x (B, F_in), state h (B, hidden) or None -> (h, h).

    r, z = sigma(W x + U h'); h~ = tanh(W x + U (r * h')); h = (1 - z) * h_{t-1} + z * h~.
    """

    def __init__(self, in_features: int, hidden_features: int, time_embed_dim: Optional[int] = None):
        super().__init__()
        self.hidden_features = hidden_features
        self.linear_x = nn.Linear(in_features, 3 * hidden_features)
        self.linear_h_gates = nn.Linear(hidden_features, 2 * hidden_features, bias=False)
        self.linear_h_candidate = nn.Linear(hidden_features, hidden_features, bias=False)
        self.time = TimeModulation(time_embed_dim, hidden_features) if time_embed_dim else None

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor], emb: Optional[torch.Tensor] = None):
        h_prev = x.new_zeros((x.shape[0], self.hidden_features)) if state is None else state
        h_mod = self.time(h_prev, emb) if self.time is not None else h_prev
        x_r, x_z, x_h = self.linear_x(x).chunk(3, dim=1)
        h_r, h_z = self.linear_h_gates(h_mod).chunk(2, dim=1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_h + self.linear_h_candidate(r * h_mod))
        h = (1 - z) * h_prev + z * candidate
        return h, h


class LinearLSTMCell(nn.Module):
    """Plain LSTM on vectors (the 'LSTM' row of the paper's Table 1): x (B, F_in) -> (h, (h, c))."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.cell = ConvTLSTMCell(in_features, hidden_features, nn.Conv1d, kernel_size=1)

    def forward(self, x: torch.Tensor, state, emb: Optional[torch.Tensor] = None):
        # a kernel-1 Conv1d over a length-1 sequence is a linear layer: reuse the one LSTM implementation
        h, (h_seq, c_seq) = self.cell(x[..., None], state)
        return h[..., 0], (h_seq, c_seq)
