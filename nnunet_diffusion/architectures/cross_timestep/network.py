"""Cross-Timestep denoiser: the image-conditioned U-Net plus APDS, SC-tLSTM and FFT-tLSTM (eq. 20).

eps = D_{SC,APDS}(E_{SC,FFT}(x_t, t), X_c, t):
- FFT-tLSTM filters the noisy mask x_t with the image's spectrum before the noise encoder;
- an SC-tLSTM block follows every noise-encoder stage and every decoder stage;
- APDS: a prior decoder on the image encoder gives 'APDS Out' and per-stage prior features, fused into every
  decoder stage as (1 - w_t) RA + w_t F_prior (eq. 2; RA: reverse attention F * (1 - sigmoid(F_prior)) added to F) with the
  weight w_t of eq. 23.
The image branch (encoder, prior decoder, condition spectrum) runs once per patch (``encode_image``); the
recurrent state of every tLSTM lives in the returned :class:`CrossTimestepCondition`, so it is reset per patch
and every batch element (sample, mirrored copy) keeps its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunet_diffusion.architectures.activation_checkpointing import maybe_checkpoint
from nnunet_diffusion.architectures.cross_timestep.apds import PriorDecoder, PriorFusion, apds_prior_weight
from nnunet_diffusion.architectures.conditional_unet import (ImageConditionedDenoiser, initialize_like_nnunet,
                                                             unet_decoder_stage)
from nnunet_diffusion.architectures.cross_timestep.fft_tlstm import FFTTLSTM
from nnunet_diffusion.architectures.cross_timestep.sc_tlstm import SCTLSTM
from nnunet_diffusion.architectures.options import StoredOptions

# the entry of CrossTimestepCondition.state that holds the deep decoder feature of the last full step (DeepCache)
DEEP_CACHE = "deep_cache"


@dataclass
class CrossTimestepCondition:
    """Per-patch condition: image features, APDS prior, condition spectrum and the recurrent state (S_t)."""
    features: List[torch.Tensor]
    prior_logits: Optional[torch.Tensor] = None
    prior_features: Optional[List[torch.Tensor]] = None
    spectrum: Optional[torch.Tensor] = None
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CrossTimestepOptions(StoredOptions):
    """Which Cross-Timestep parts are on (the paper's ablations are combinations of these); stored in plans.json
    ('diffusion' block, 'options')."""
    apds: bool = True
    apds_alpha: float = 0.8      # the paper gives no value; 0.8 keeps a fifth of the main branch at t = T
    # APDS RA block (apds.RA_KINDS). The paper wants the prior "to prevent ... overly interfering with the main model's
    # predictions, especially during the later, low-noise stages", where eq. 23's w_t < 0.1 (t < 555) leaves the fused
    # feature ~RA: the reverse attention of the OpenReview notes, F * (1 - sigmoid(F_prior)), scales every main
    # feature down there (held-out Dice 0.46 against 0.70 for the residual form F + F * (1 - sigmoid(F_prior)) in
    # one run, benchmarks/results_cpu_cross_timestep_fusion.md). The residual form is the default;
    # 'reverse_attention': nnUNetTrainerCrossTimestep_reverseAttention; 'conv': a conv block (_convRA)
    ra: str = "residual_reverse_attention"
    sc: bool = True
    fft: bool = True
    fft_gate: str = "log"        # FFT-tLSTM gate: 'log' (60 dB log-magnitude) or 'linear' (|F_c| / max): fft_tlstm.py
    spatial_cell: str = "conv_tlstm"
    channel_cell: str = "linear_tgru"
    time_cell: bool = True
    carry_spatial: bool = True   # False: the cell's state is reset every step (no memory across timesteps)
    carry_channel: bool = True
    # SC-tLSTM's spatial branch on its axis summaries ('axis': the cell at the summaries' size) or broadcast back to
    # the patch ('broadcast', _broadcastSC: the cell at full resolution in every stage); sc_tlstm.py says why
    spatial_summary: str = "axis"
    # the paper gives no initialisation: True starts FFT-tLSTM and SC-tLSTM as the identity (zero output projection,
    # open attention maps), so the network starts as its plain U-Net; False: nnU-Net's He init for them too
    identity_start: bool = True
    # DeepCache (Ma et al., CVPR 2024; issue 22's cost lever, the paper computes every step in full): 0 runs every
    # step in full. n > 0: every second step of a chain (the step after a full one, in training's unrolled pairs as
    # in sampling) runs only the shallowest n noise-encoder stages and the last n decoder stages, on the deep decoder
    # feature the full step before left; the deeper stages' tLSTM states are carried unchanged over it
    deep_cache_stages: int = 0

    @classmethod
    def legacy_values(cls) -> dict:
        # what models stored before these defaults had: the reverse attention alone, nnU-Net's He init throughout
        return {"ra": "reverse_attention", "identity_start": False, "spatial_summary": "broadcast"}


class CrossTimestepDenoiser(ImageConditionedDenoiser):
    """forward(x_t (B, C, *S), t (B,), condition) -> eps (B, C, *S); updates condition.state in place.

    ``checkpoint_activations`` (training only): every encoder, tLSTM, decoder and prior-decoder stage recomputes
    its activations in backward. Without it, training unrolls several full passes plus the image branch and the
    prior decoder and needed 4.4x the stock trainer's GPU memory at nnU-Net's planned patch and batch.
    ``checkpoint_levels`` (None: every level): only the stages at that many of the finest resolution levels are
    checkpointed (level 0: full resolution, with the FFT-tLSTM; an encoder stage's level is its index, a decoder
    stage's that of the skip it joins). Why: a U-Net stage's activations shrink about 2-4x per level while its
    compute stays about equal, so the finest levels hold most of the memory for a fraction of the recompute.
    """

    def __init__(self, image_channels: int, num_classes: int, num_timesteps: int,
                 options: CrossTimestepOptions = CrossTimestepOptions(), checkpoint_activations: bool = False,
                 deep_supervision: bool = False, checkpoint_levels: Optional[int] = None, **unet_kwargs):
        super().__init__(image_channels, num_classes, deep_supervision=deep_supervision, **unet_kwargs)
        if not 0 <= options.deep_cache_stages < len(self.noise_encoder.stages):
            raise ValueError(f"deep_cache_stages must be in 0..{len(self.noise_encoder.stages) - 1} (the decoder's "
                             f"{len(self.noise_encoder.stages) - 1} stages), got {options.deep_cache_stages}")
        if options.deep_cache_stages and deep_supervision:
            raise ValueError("deep_cache_stages and deep supervision do not combine: a cached step computes only the "
                             "last decoder stages, so the lower-resolution heads have no output there")
        self.options = options
        self.checkpoint_activations, self.checkpoint_levels = checkpoint_activations, checkpoint_levels
        self.num_timesteps = num_timesteps
        conv_op, time_dim = unet_kwargs["conv_op"], self.time_mlp.dim
        channels = self.noise_encoder.output_channels
        decoder_channels = [channels[-(s + 2)] for s in range(len(channels) - 1)]
        sc_kwargs = dict(spatial_cell=options.spatial_cell, channel_cell=options.channel_cell,
                         time_cell=options.time_cell, carry_spatial=options.carry_spatial,
                         carry_channel=options.carry_channel, spatial_summary=options.spatial_summary)
        if options.sc:
            self.sc_encoder = nn.ModuleList(SCTLSTM(c, conv_op, time_dim, **sc_kwargs) for c in channels)
            self.sc_decoder = nn.ModuleList(SCTLSTM(c, conv_op, time_dim, **sc_kwargs) for c in decoder_channels)
        if options.fft:
            self.fft = FFTTLSTM(num_classes, image_channels, conv_op, time_dim if options.time_cell else None,
                                carry_state=options.carry_spatial, gate=options.fft_gate)
        if options.apds:
            self.prior_decoder = PriorDecoder(UNetDecoder(self.image_encoder, num_classes,
                                                          unet_kwargs["n_conv_per_stage_decoder"],
                                                          deep_supervision=False))
            norm = dict(norm_op=unet_kwargs.get("norm_op"), norm_op_kwargs=unet_kwargs.get("norm_op_kwargs"),
                        nonlin=unet_kwargs.get("nonlin"), nonlin_kwargs=unet_kwargs.get("nonlin_kwargs"))
            self.fusions = nn.ModuleList(PriorFusion(c, conv_op, **norm, ra=options.ra) for c in decoder_channels)
        initialize_like_nnunet(self)  # the blocks added here too (tLSTM, FFT, prior decoder), as nnU-Net's U-Net
        if options.identity_start:
            for block in [*(self.sc_encoder if options.sc else []), *(self.sc_decoder if options.sc else []),
                          *([self.fft] if options.fft else [])]:
                block.start_as_identity()

    def _checkpoints(self, level: int) -> bool:
        """Whether stages at resolution level ``level`` (0: full resolution) recompute their activations."""
        return self.checkpoint_activations and (self.checkpoint_levels is None or level < self.checkpoint_levels)

    def _checkpointed(self, level: int, function, *args):
        return maybe_checkpoint(self, self._checkpoints(level), function, *args)

    def _decoder_level(self, s: int) -> int:
        """Resolution level of decoder stage s (lowest resolution first): that of the skip it joins."""
        return len(self.image_encoder.stages) - 2 - s

    def encode_image(self, image: torch.Tensor) -> CrossTimestepCondition:
        features, x = [], image
        for level, stage in enumerate(self.image_encoder.stages):  # PlainConvEncoder.forward, a checkpoint each
            x = self._checkpointed(level, stage, x)
            features.append(x)
        condition = CrossTimestepCondition(features)
        if self.options.apds:
            condition.prior_logits, condition.prior_features = self.prior_decoder(
                features, lambda function, s, *args: self._checkpointed(self._decoder_level(s), function, s, *args))
        if self.options.fft:
            condition.spectrum = self.fft.condition_spectrum(image)
        return condition

    def repeat_condition(self, condition: CrossTimestepCondition, n: int) -> CrossTimestepCondition:
        def rep(x):
            return None if x is None else x.repeat_interleave(n, dim=0)
        return CrossTimestepCondition(
            [rep(f) for f in condition.features], rep(condition.prior_logits),
            None if condition.prior_features is None else [rep(f) for f in condition.prior_features],
            rep(condition.spectrum))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: CrossTimestepCondition,
                all_scales: bool = False):
        """-> (B, C, *S); with ``all_scales`` (deep supervision) every kept head's logits, full resolution first.
        With ``options.deep_cache_stages`` = n, a step that follows a full one (its deep feature in
        ``condition.state``) runs only encoder stages 0..n-1 and the last n decoder stages (DeepCache)."""
        emb, state = self.time_mlp(t), condition.state
        n_encoder, n_decoder, cache = len(self.noise_encoder.stages), len(self.decoder.stages), \
            self.options.deep_cache_stages
        cached = state.pop(DEEP_CACHE, None)  # a cached step consumes it: the step after it is a full one again
        x = self.fft(x_t, condition.spectrum, emb, state, self._checkpoints(0)) if self.options.fft else x_t
        skips = []
        for s in range(cache if cached is not None else n_encoder):
            sc = self.sc_encoder[s] if self.options.sc else None
            x, *new_state = self._checkpointed(s, self.encoder_block, s, x, emb, condition.features,
                                               sc.previous(state) if sc else None)
            if sc:
                sc.store(state, *new_state)
            skips.append(x)
        weight = apds_prior_weight(t, self.num_timesteps, self.options.apds_alpha) if self.options.apds else None
        heads, first = [], n_decoder - cache if cached is not None else 0
        if cached is not None:
            x = cached
        for s in range(first, n_decoder):
            if cache and cached is None and s == n_decoder - cache:
                state[DEEP_CACHE] = x  # the input of the last n decoder stages, for the next (cached) step
            prior = condition.prior_features[s] if self.options.apds else None
            sc = self.sc_decoder[s] if self.options.sc else None
            x, *new_state = self._checkpointed(self._decoder_level(s), self.decoder_block, s, x,
                                               skips[n_encoder - s - 2], prior, weight, emb,
                                               sc.previous(state) if sc else None)
            if sc:
                sc.store(state, *new_state)
            if all_scales and not isinstance(self.decoder.seg_layers[s], nn.Identity):
                heads.append(self.decoder.seg_layers[s](x))
        return heads[::-1] if all_scales else self.decoder.seg_layers[-1](x)

    # Each block below is one checkpoint: its SC-tLSTM state comes in and goes out explicitly (pure functions), so
    # recomputation in backward sees the state of the forward pass, and only the block's output is kept.

    def encoder_block(self, s: int, x, emb, features, previous):
        """Noise-encoder stage s (+ image features and time) and its SC-tLSTM -> (out, new channel state, new
        spatial state); the states are None without SC."""
        x = self.conditioned_stage(s, x, emb, features)
        return self.sc_encoder[s].step(x, emb, *previous) if previous is not None else (x, None, None)

    def decoder_block(self, s: int, x, skip, prior, weight, emb, previous):
        """Decoder stage s, the APDS fusion and its SC-tLSTM -> (out, new channel state, new spatial state)."""
        x = self.decoder_stage(s, x, skip, prior, weight)
        return self.sc_decoder[s].step(x, emb, *previous) if previous is not None else (x, None, None)

    def decoder_stage(self, s: int, x: torch.Tensor, skip: torch.Tensor, prior: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor]) -> torch.Tensor:
        """Decoder stage s on the lower stage's output and the skip, then the APDS fusion with the prior's
        features of that stage (when APDS is on)."""
        x = unet_decoder_stage(self.decoder, s, x, skip)
        return x if prior is None else self.fusions[s](x, prior, weight)
