"""SC-tLSTM (Cross-Timestep sec. 3.4): spatial and channel attention whose maps come from recurrent cells.

Channel branch: avg- and max-pooled descriptors (B, 2C) -> Linear-tGRU -> sigmoid -> M_c (B, C, 1, ...).
Spatial branch: the feature map, reduced to k channels by a 1x1 conv, is average-pooled along each spatial
axis (eq. 9's P_x, P_y, P_z). Two readings of how the summaries reach the Conv-tLSTM (``spatial_summary``):
- 'axis' (default): one Conv-tLSTM, shared by the summaries, runs on each summary at its own size (a plane of a 3D
  patch, a line of a 2D one), each with its own state; M_s = sigmoid(sum of the 1x1-projected summaries broadcast
  to the patch) (B, 1, *S), as coordinate attention joins its axis summaries. Why: the cell then costs what the
  summaries cost, (H + W) / (H * W) of the patch in 2d and (DH + DW + HW) / DHW in 3d (1/16 at a 20 x 192 x 192
  CT patch), where the broadcast reading runs it at full resolution in every stage.
- 'broadcast' (the first reading, _broadcastSC): the summaries broadcast back to the patch and concatenated along
  the channels -> Conv-tLSTM at full resolution -> 1x1 conv -> sigmoid -> M_s.
F_out = M_s * (M_c * F) (eqs. 13-14). The recurrent state lives in a dict owned by the caller (one per patch).
"""
from __future__ import annotations

import math
from typing import Type

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn

from nnunet_diffusion.architectures.cross_timestep.tlstm import ConvTLSTMCell, LinearLSTMCell, LinearTGRUCell

SPATIAL_CELLS = ("conv_tlstm", "lstm")
SPATIAL_SUMMARIES = ("axis", "broadcast")
CHANNEL_CELLS = ("linear_tgru", "lstm")


class SCTLSTM(nn.Module):
    """x (B, C, *S), emb (B, E), state dict -> (B, C, *S).

    spatial_cell: 'conv_tlstm' (3x3 Conv-tLSTM) or 'lstm' (plain per-voxel LSTM, no time modulation).
    channel_cell: 'linear_tgru' or 'lstm' (plain linear LSTM). time_cell: modulate h_{t-1} by E_t.
    carry_spatial / carry_channel: keep that branch's state across timesteps (False: reset every step, i.e.
    the same attention without memory, for ablations). spatial_summary: 'axis' or 'broadcast' (module docstring).
    """

    def __init__(self, channels: int, conv_op: Type[nn.Module], time_embed_dim: int,
                 spatial_cell: str = "conv_tlstm", channel_cell: str = "linear_tgru", time_cell: bool = True,
                 carry_spatial: bool = True, carry_channel: bool = True, spatial_summary: str = "axis"):
        super().__init__()
        if spatial_cell not in SPATIAL_CELLS or channel_cell not in CHANNEL_CELLS:
            raise ValueError(f"spatial_cell must be one of {SPATIAL_CELLS}, channel_cell one of {CHANNEL_CELLS}")
        if spatial_summary not in SPATIAL_SUMMARIES:
            raise ValueError(f"spatial_summary must be one of {SPATIAL_SUMMARIES}, got {spatial_summary!r}")
        self.dims = convert_conv_op_to_dim(conv_op)
        self.spatial_summary = spatial_summary
        reduced = max(2, channels // 8)
        time_dim = time_embed_dim if time_cell else None
        self.reduce = conv_op(channels, reduced, 1)
        cell_in = reduced if spatial_summary == "axis" else self.dims * reduced
        if spatial_cell == "conv_tlstm":
            self.spatial_cell = ConvTLSTMCell(cell_in, reduced, conv_op, 3, time_dim)
        else:
            self.spatial_cell = ConvTLSTMCell(cell_in, reduced, conv_op, 1, None)
        self.spatial_out = conv_op(reduced, 1, 1)
        if channel_cell == "linear_tgru":
            self.channel_cell = LinearTGRUCell(2 * channels, channels, time_dim)
        else:
            self.channel_cell = LinearLSTMCell(2 * channels, channels)
        self.channel_out = nn.Linear(channels, channels)
        self.carry_spatial, self.carry_channel = carry_spatial, carry_channel

    def start_as_identity(self, open_gate: float = 0.95) -> None:
        """Both attention maps start at ``open_gate`` everywhere (zero weights, bias logit(open_gate)): F_out ~ F.
        Why: random maps near 0.5 scale every stage by ~1/4 and multiply it by noise at the start of training."""
        bias = math.log(open_gate / (1 - open_gate))
        for layer in (self.channel_out, self.spatial_out):
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, bias)
        if self.spatial_summary == "axis":  # M_s sums one projected summary per axis
            nn.init.constant_(self.spatial_out.bias, bias / self.dims)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, state: dict) -> torch.Tensor:
        """Reads and updates this block's entries of ``state`` (``previous``, ``step``, ``store``)."""
        out, new_c, new_s = self.step(x, emb, *self.previous(state))
        self.store(state, new_c, new_s)
        return out

    def previous(self, state: dict) -> tuple:
        """(channel state or None, spatial (h, c) or None) this block left in ``state`` (None when not carried)."""
        return (state.get((self, "c")) if self.carry_channel else None,
                state.get((self, "s")) if self.carry_spatial else None)

    def store(self, state: dict, new_c, new_s) -> None:
        state[(self, "c")], state[(self, "s")] = new_c, new_s

    def step(self, x: torch.Tensor, emb: torch.Tensor, previous_c, previous_s):
        """One step with explicit state: (x, emb, channel state or None, spatial state or None) ->
        (out (B, C, *S), new channel state, new spatial state). The spatial state is the cell's (h, c), per axis
        summary for 'axis' (a tuple of them, one per spatial axis)."""
        spatial_axes = tuple(range(2, x.ndim))
        # channel branch (eqs. 11-12)
        descriptor = torch.cat([x.mean(dim=spatial_axes), x.amax(dim=spatial_axes)], dim=1)
        h_c, new_c = self.channel_cell(descriptor, previous_c, emb)
        m_c = torch.sigmoid(self.channel_out(h_c)).reshape(*h_c.shape, *([1] * self.dims))
        # spatial branch (eqs. 9-10)
        reduced = self.reduce(x)
        summaries = [reduced.mean(dim=axis, keepdim=True) for axis in spatial_axes]
        if self.spatial_summary == "broadcast":
            h_s, new_s = self.spatial_cell(torch.cat([p.expand_as(reduced) for p in summaries], dim=1), previous_s,
                                           emb)
            m_s = torch.sigmoid(self.spatial_out(h_s))
        else:
            previous_s = previous_s or (None,) * len(summaries)
            steps = [self.spatial_cell(p, state, emb) for p, state in zip(summaries, previous_s)]
            new_s = tuple(state for _, state in steps)
            m_s = torch.sigmoid(sum(self.spatial_out(h) for h, _ in steps))  # broadcasts to (B, 1, *S)
        return m_s * (m_c * x), new_c, new_s
