"""APDS (Cross-Timestep sec. 3.1, Appendix B): a prior decoder on the image branch and time-weighted fusion."""
from __future__ import annotations

from typing import List, Type

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn

from nnunet_diffusion.architectures.conditional_unet import keep_last_seg_layer, unet_decoder_stage


def apds_prior_weight(t: torch.Tensor, num_timesteps: int, alpha: float) -> torch.Tensor:
    """w_t = alpha * exp(-5 (1 - t/T)) * (1 - exp(-10 t/T))  (eq. 23). t: (B,) -> (B,) float."""
    u = t.float() / num_timesteps
    return alpha * torch.exp(-5.0 * (1 - u)) * (1 - torch.exp(-10.0 * u))


class PriorDecoder(nn.Module):
    """Decodes a segmentation from the image encoder's features alone ('APDS Out').

    Mirrors the main decoder's layout (a dynamic_network_architectures UNetDecoder built on the image encoder,
    without deep supervision) and also returns the feature map of every decoder stage, which the main decoder
    fuses with its own. Only the last segmentation head is used: the others are removed (``keep_last_seg_layer``).
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = keep_last_seg_layer(decoder)

    def forward(self, skips: List[torch.Tensor], run=None):
        """skips: image-encoder features [(B, F_s, *S_s)], bottleneck last -> (logits (B, C, *S),
        [decoder stage features (B, F_s, *S_s)], lowest resolution first). ``run(function, *args)`` runs each
        stage (e.g. with activation checkpointing); default: a plain call."""
        features, x = [], skips[-1]
        for s in range(len(self.decoder.stages)):
            x = run(self.stage, s, x, skips[-(s + 2)]) if run is not None else self.stage(s, x, skips[-(s + 2)])
            features.append(x)
        return self.decoder.seg_layers[-1](x), features

    def stage(self, s: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return unet_decoder_stage(self.decoder, s, x, skip)


RA_KINDS = ("reverse_attention", "conv", "residual_reverse_attention")


class PriorFusion(nn.Module):
    """F_fused = (1 - w_t) * RA(F, F_prior) + w_t * F_prior (eq. 2).

    ra='reverse_attention' (the RA block of the paper's OpenReview notes): RA = F * (1 - sigmoid(F_prior)), the main
    features where the prior is not already confident (variant _reverseAttention). It has no parameters.
    ra='conv': one conv block on [F | F_prior] (this package's earlier RA; variant nnUNetTrainerCrossTimestep_convRA).
    ra='residual_reverse_attention' (CrossTimestepOptions' default): F + F * (1 - sigmoid(F_prior)), PraNet's
    residual form: where the prior is confident the main features pass unchanged instead of being suppressed, so at
    low t (w_t ~ 0) the prior does not "overly interfere" with the main branch. No parameters either.
    """

    def __init__(self, channels: int, conv_op: Type[nn.Module], norm_op, norm_op_kwargs, nonlin, nonlin_kwargs,
                 ra: str = "reverse_attention"):
        super().__init__()
        if ra not in RA_KINDS:
            raise ValueError(f"Unknown RA block {ra!r}. Choose one of {list(RA_KINDS)}.")
        self.ra = ra
        if ra == "conv":
            self.refine = StackedConvBlocks(1, conv_op, 2 * channels, channels, 3, 1, True, norm_op, norm_op_kwargs,
                                            None, None, nonlin, nonlin_kwargs)

    def refined(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        if self.ra == "conv":
            return self.refine(torch.cat([x, prior], dim=1))
        attention = x * (1 - torch.sigmoid(prior))
        return x + attention if self.ra == "residual_reverse_attention" else attention

    def forward(self, x: torch.Tensor, prior: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x, prior: (B, C, *S) main and prior decoder features; weight: (B,) w_t."""
        w = weight.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - w) * self.refined(x, prior) + w * prior

    def load_mismatch_hint(self, state_dict: dict, prefix: str):
        """What a failed ``load_state_dict`` should say if the checkpoint has the other RA block, else None
        (DiffusionSegmenter.load_state_dict asks every submodule)."""
        has_conv = any(key.startswith(prefix + "refine.") for key in state_dict)
        if self.ra != "conv" and has_conv:
            return ("This checkpoint has weights for a conv RA block ('fusions.<stage>.refine.*'): it was trained "
                    "with the earlier Cross-Timestep fusion, which is now the variant "
                    "nnUNetTrainerCrossTimestep_convRA; nnUNetTrainerCrossTimestep now uses the "
                    "parameter-free reverse attention, F + F * (1 - sigmoid(F_prior)). To predict with (or continue) this "
                    "model, point its checkpoint at the variant: c = torch.load(path, weights_only=False); "
                    "c['trainer_name'] = 'nnUNetTrainerCrossTimestep_convRA'; torch.save(c, path), and rename the "
                    "model folder to nnUNetTrainerCrossTimestep_convRA__<plans>__<configuration> for -tr lookups. "
                    "An ablation variant trained before the change needs a subclass with "
                    "options = replace(<variant>.options, ra='conv').")
        if self.ra == "conv" and not has_conv:
            return ("This checkpoint has no weights for the conv RA block ('fusions.<stage>.refine.*') that this "
                    "model (options.ra='conv', e.g. nnUNetTrainerCrossTimestep_convRA) needs: it was trained with "
                    "the parameter-free reverse attention (nnUNetTrainerCrossTimestep and its other variants).")
        return None

