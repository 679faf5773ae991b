"""FFT-tLSTM (Cross-Timestep sec. 3.5, eqs. 15-17): a recurrent filter in the frequency domain.

F_t = FFT(x_t), F_c = FFT(P(X_c)) (P: 1x1 conv from the image's channels to the mask's, computed once per
patch); the sum is filtered (1x1 conv over [real | imag]), passed through a Conv-tLSTM whose state is carried
across timesteps, gated by the condition's spectrum and transformed back: X_out = iFFT(F~) + x_t.
Choices where the paper is silent: real FFTs (rfftn/irfftn) so the output is real by construction; the gate is
the condition's log-magnitude spectrum per channel relative to its maximum, over a 60 dB range, in [0, 1]
(``spectrum_gate``). Why: an unnormalised F_c product would rescale the mask by the image's energy, and the
linear |F_c| / max |F_c| (the first reading, kept as ``gate="linear"``) is ~1 at the DC term and at most 0.015
at every other frequency of a 40 x 40 brain patch, so the block was near the identity; on a log axis the
frequencies spread over the gate's range (tested on a real image patch).

Precision: the transforms are orthonormal (norm="ortho"; Parseval: the coefficients have the RMS of the voxels,
only the DC of a near-constant channel reaches sqrt(N)). The unnormalised rfftn's DC grows like the voxel count N
(1e5 to 1e6 per patch): it saturated the LSTM gates and overflowed float16 (max 65504) in the 1x1 filter conv
under autocast, giving inf and then NaN everywhere. The whole block runs in float32 with autocast off (spectra
are complex64 anyway, and its few channels make it cheap); the result is cast back to the input's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Type

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn

from nnunet_diffusion.architectures.activation_checkpointing import maybe_checkpoint
from nnunet_diffusion.architectures.cross_timestep.tlstm import ConvTLSTMCell


GATES = ("log", "linear")
GATE_DYNAMIC_RANGE = 1e-3  # the log gate's floor: 60 dB below the spectrum's maximum maps to 0


def spectrum_gate(spectrum: torch.Tensor, spatial_dims: int, kind: str = "log") -> torch.Tensor:
    """complex (B, C, *S') spectrum -> (B, C, *S') float gate in [0, 1], per batch element and channel.

    'log': 1 + log10(|F| / max |F| + r) / (-log10 r), clamped at 0, with r = GATE_DYNAMIC_RANGE: 1 at the maximum,
    0 at 60 dB below it, linear in dB between. 'linear': |F| / max |F|."""
    if kind not in GATES:
        raise ValueError(f"FFT-tLSTM gate must be one of {GATES}, got {kind!r}")
    magnitude = spectrum.abs()
    peak = magnitude.flatten(2).amax(dim=2).clamp_min(1e-12).reshape(*magnitude.shape[:2], *([1] * spatial_dims))
    relative = magnitude / peak
    if kind == "linear":
        return relative
    floor = -math.log10(GATE_DYNAMIC_RANGE)
    return (1 + torch.log10(relative + GATE_DYNAMIC_RANGE) / floor).clamp(0, 1)


class FFTTLSTM(nn.Module):
    """x_t (B, C, *S), condition spectrum from ``condition_spectrum`` -> (B, C, *S) real."""

    def __init__(self, channels: int, image_channels: int, conv_op: Type[nn.Module],
                 time_embed_dim: Optional[int], hidden_channels: int = 8, carry_state: bool = True,
                 gate: str = "log"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"FFT-tLSTM gate must be one of {GATES}, got {gate!r}")
        self.gate = gate
        self.dims = convert_conv_op_to_dim(conv_op)
        self.project_condition = conv_op(image_channels, channels, 1)
        self.filter = conv_op(2 * channels, 2 * channels, 1)
        self.cell = ConvTLSTMCell(2 * channels, hidden_channels, conv_op, 3, time_embed_dim)
        self.out = conv_op(hidden_channels, 2 * channels, 1)
        self.carry_state = carry_state

    def start_as_identity(self) -> None:
        """Zero the output projection: the block's filtered term is 0 and X_out = x_t until it learns one. Why:
        with the log gate a random projection adds O(1) noise to every voxel of x_t at the start of training."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _axes(self, x: torch.Tensor):
        return tuple(range(x.ndim - self.dims, x.ndim))

    def condition_spectrum(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C_img, *S) -> complex64 (B, C, *S') orthonormal spectrum, S' the rfft grid. Once per patch."""
        with torch.autocast(image.device.type, enabled=False):
            return torch.fft.rfftn(self.project_condition(image.float()), dim=self._axes(image), norm="ortho")

    # eager under torch.compile: inductor has no code for complex tensors, and its backward of torch.complex failed
    # (stride assertion) where the rest of the denoiser compiles (architectures/compilation.py)
    @torch.compiler.disable
    def forward(self, x_t: torch.Tensor, spectrum_c: torch.Tensor, emb: Optional[torch.Tensor],
                state: dict, checkpointed: bool = False) -> torch.Tensor:
        """x_t (B, C, *S), spectrum_c complex (B, C, *S'), emb (B, E) or None -> (B, C, *S) in x_t's dtype.
        Updates ``state[self]`` (the cell's (h, c), float32, on the rfft grid). ``checkpointed``: recompute the
        activations in backward (training), through the pure ``step``."""
        out, state[self] = maybe_checkpoint(self, checkpointed, self.step, x_t, spectrum_c, emb,
                                            state.get(self) if self.carry_state else None)
        return out

    def step(self, x_t: torch.Tensor, spectrum_c: torch.Tensor, emb: Optional[torch.Tensor], previous):
        """One step with explicit state (the cell's (h, c) or None) -> (out (B, C, *S), new (h, c))."""
        axes = self._axes(x_t)
        with torch.autocast(x_t.device.type, enabled=False):
            combined = torch.fft.rfftn(x_t.float(), dim=axes, norm="ortho") + spectrum_c
            filtered = self.filter(torch.cat([combined.real, combined.imag], dim=1))
            h, new_state = self.cell(filtered, previous, None if emb is None else emb.float())
            real, imag = self.out(h).chunk(2, dim=1)
            gate = spectrum_gate(spectrum_c, self.dims, self.gate)
            filtered_x = torch.fft.irfftn(torch.complex(real, imag) * gate, s=x_t.shape[2:], dim=axes, norm="ortho")
        return filtered_x.to(x_t.dtype) + x_t, new_state
