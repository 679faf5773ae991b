"""UniSegDiff's networks (Sec. 2.1, 2.3): CFENet, the condition network, and DNet, the denoiser.

CFENet is nnU-Net's own U-Net for the plans (PlainConvUNet, or ResidualEncoderUNet for ResEnc plans): pre-trained
for segmentation (the stock nnU-Net checkpoint, or a first phase of our trainer) and frozen when the network is
built, so DDP never expects its gradients. Its encoder's per-stage features are the conditions CF_i. The ablation without pre-training uses a
plain encoder trained jointly with DNet (a frozen-or-unused decoder would be dead weight under DDP).

DNet: a noise encoder on the noisy mask x_t with the plans' layout (as CFENet, so CF_i and DF_i have the same
channels at every stage), a timestep embedding added at every stage, the conditions fused at every stage, and
one decoder per prediction head ('eps', 'x0'; each a UNetDecoder over the same skips). Fusion: DCA (dual
cross-attention, ``dca.py``) at the stages whose voxel count at the planned patch is at most ``max_tokens``
(the coarse ones: attention memory grows with the square of the voxels), and addition (Diff-UNet's feature
fusion) at the others and everywhere in the ablation without DCA. ``DCA_MAX_TOKENS`` says why 1024.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunet_diffusion.architectures.activation_checkpointing import maybe_checkpoint
from nnunet_diffusion.architectures.conditional_unet import (RESIDUAL_BLOCKS, TimestepMLP, initialize_like_nnunet,
                                                             keep_last_seg_layer, plans_encoder)
from nnunet_diffusion.architectures.unisegdiff.dca import DualCrossAttention

HEADS = ("eps", "x0")
CONDITIONS = ("pretrained", "joint")
# DCA only where a stage has at most this many voxels at the planned patch (the builder's default; the trainer passes
# its stored ``dca_max_tokens``, 256 today). Measured on the example's 2d plan (40 x 40 patch, 2 cores): DCA at the
# full-resolution stage too (1600 voxels) made a DNet call 3.2x slower than none, DCA at the three coarser stages
# 1.9x. In 3d it keeps attention to the coarse stages (e.g. 10 x 12 x 8).
DCA_MAX_TOKENS = 1024


def stage_voxels(patch_size: Sequence[int], strides) -> List[int]:
    """Voxels of each encoder stage's feature map for a patch: the patch divided by the cumulative strides."""
    shape, voxels = list(patch_size), []
    for stride in strides:
        stride = [stride] * len(shape) if isinstance(stride, int) else stride
        shape = [max(1, s // k) for s, k in zip(shape, stride)]
        voxels.append(math.prod(shape))
    return voxels


def build_cfenet(image_channels: int, num_classes: int, condition: str, encoder_kwargs: dict,
                 n_conv_per_stage_decoder) -> nn.Module:
    """'pretrained': nnU-Net's own U-Net of the plans (PlainConvUNet, or ResidualEncoderUNet for ResEnc plans; loads
    a stock checkpoint strictly: the decoder heads that ``keep_last_seg_layer`` drops are discarded on load),
    frozen. 'joint': only an encoder, trained with DNet."""
    if condition == "joint":
        return plans_encoder(image_channels, **encoder_kwargs)
    unet = ResidualEncoderUNet if RESIDUAL_BLOCKS in encoder_kwargs else PlainConvUNet
    network = unet(image_channels, num_classes=num_classes, n_conv_per_stage_decoder=n_conv_per_stage_decoder,
                   deep_supervision=False, **encoder_kwargs)
    keep_last_seg_layer(network.decoder)
    for parameter in network.parameters():  # frozen at build: DDP registers only DNet's parameters
        parameter.requires_grad_(False)
    return network


class UniSegDiffDenoiser(nn.Module):
    """CFENet + DNet. ``encode_image`` (once per patch) -> CF_i; ``forward(x_t, t, CF)`` -> one tensor per head.

    Args: the plans' U-Net arguments (plain or ResEnc) (``encoder_kwargs`` as ``plans_encoder`` takes them, and
    ``n_conv_per_stage_decoder``) plus: ``heads`` (('eps', 'x0') for the staged
    model, one of them for the uniform ablations; a single head returns a tensor, two a tuple), ``condition``
    ('pretrained' or 'joint'), ``use_dca``, ``patch_size`` (decides where DCA fits), ``max_tokens`` and
    ``checkpoint_activations`` (see ``decode``).
    """

    def __init__(self, image_channels: int, num_classes: int, n_conv_per_stage_decoder,
                 heads: Tuple[str, ...] = HEADS, condition: str = "pretrained", use_dca: bool = True,
                 patch_size: Sequence[int] = (), max_tokens: int = DCA_MAX_TOKENS,
                 checkpoint_activations: bool = False, time_embed_dim: int = 128, **encoder_kwargs):
        super().__init__()
        if not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct names out of {HEADS}, got {heads}")
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        self.num_classes, self.heads, self.condition = num_classes, tuple(heads), condition
        self.checkpoint_activations = checkpoint_activations
        self.spatial_dims = convert_conv_op_to_dim(encoder_kwargs["conv_op"])
        self.cfenet = build_cfenet(image_channels, num_classes, condition, encoder_kwargs, n_conv_per_stage_decoder)
        self.noise_encoder = plans_encoder(num_classes, **encoder_kwargs)
        self.time_mlp = TimestepMLP(time_embed_dim)
        self.time_projections = nn.ModuleList(nn.Linear(time_embed_dim, f) for f in self.noise_encoder.output_channels)
        strides = encoder_kwargs["strides"]
        voxels = stage_voxels(patch_size, strides) if patch_size else [math.inf] * len(strides)
        self.dca_stages = tuple(s for s, n in enumerate(voxels) if use_dca and n <= max_tokens)
        self.dca = nn.ModuleDict({str(s): DualCrossAttention(self.noise_encoder.output_channels[s],
                                                             max_tokens=max_tokens) for s in self.dca_stages})
        self.decoders = nn.ModuleDict({
            head: keep_last_seg_layer(UNetDecoder(self.noise_encoder, num_classes, n_conv_per_stage_decoder,
                                                  deep_supervision=False)) for head in self.heads})
        initialize_like_nnunet(self)  # as stock nnU-Net builds its U-Nets (a pre-trained CFENet is loaded after)

    @property
    def cfenet_encoder(self) -> nn.Module:
        return self.cfenet if self.condition == "joint" else self.cfenet.encoder

    def cfenet_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.cfenet.parameters())

    def encode_image(self, image: torch.Tensor) -> List[torch.Tensor]:
        """(B, image_channels, *S) -> CF_i, [(B, F_s, *S_s)] per stage. A frozen CFENet runs without a graph."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfenet_frozen()):
            return self.cfenet_encoder(image)

    def repeat_condition(self, features: List[torch.Tensor], n: int) -> List[torch.Tensor]:
        return [f.repeat_interleave(n, dim=0) for f in features]

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """CFENet's own segmentation logits (B, num_classes, *S): what its pre-training phase trains."""
        if self.condition == "joint":
            raise RuntimeError("the jointly trained condition encoder has no segmentation decoder")
        return self.cfenet(image)

    def fused_skips(self, x_t: torch.Tensor, t: torch.Tensor, condition: List[torch.Tensor]) -> List[torch.Tensor]:
        """Noise-encoder stages with the time embedding, each fused with CF_s (DCA or addition)."""
        emb = self.time_mlp(t)
        skips, x = [], x_t
        for s, stage in enumerate(self.noise_encoder.stages):
            time = self.time_projections[s](emb).reshape(*emb.shape[:1], -1, *([1] * self.spatial_dims))
            denoising = stage(x) + time
            x = (self.dca[str(s)](condition[s], denoising) if s in self.dca_stages
                 else denoising + condition[s])
            skips.append(x)
        return skips

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: List[torch.Tensor],
                head: Optional[str] = None, chunk_heads: Optional[Sequence[str]] = None):
        """x_t (B, num_classes, *S), t (B,), CF from encode_image -> per head (B, num_classes, *S): eps, or class
        logits for 'x0'. One head (or ``head`` named: only that decoder runs, for samplers): that tensor; two: a
        tuple in ``heads`` order. ``chunk_heads`` (samplers): the batch is len(chunk_heads) equal chunks, chunk i
        decoded by head chunk_heads[i] only (B, num_classes, *S): the staged sampler's two chains share one encoder
        pass and each runs only the decoder it needs."""
        skips = self.fused_skips(x_t, t, condition)
        if chunk_heads is not None:
            if x_t.shape[0] % len(chunk_heads):
                raise ValueError(f"a batch of {x_t.shape[0]} does not split into {len(chunk_heads)} equal chunks")
            chunks = zip(*[skip.chunk(len(chunk_heads)) for skip in skips])
            return torch.cat([self.decode(name, list(chunk)) for name, chunk in zip(chunk_heads, chunks)])
        if head is not None:
            return self.decode(head, skips)
        outputs = tuple(self.decode(name, skips) for name in self.heads)
        return outputs[0] if len(outputs) == 1 else outputs

    def decode(self, head: str, skips: List[torch.Tensor]) -> torch.Tensor:
        """One decoder on the fused skips. With ``checkpoint_activations`` (training only), its activations are
        recomputed in the backward pass instead of kept: two full-resolution decoders otherwise hold twice the
        stock U-Net's decoder activations."""
        return maybe_checkpoint(self, self.checkpoint_activations, self.decoders[head], skips)
