"""DSM's networks: stage 1 (organ queries, kMMM decoder) and stage 2 (tumour queries refined with the anomaly mask
prompt and diffusion-guided features), on the plans' nnU-Net U-Net.

Queries are matched to classes by index (query k <-> its class k, MaskFormer's fixed matching for semantic
segmentation): a query's mask logits are ``<query, pixel embedding>`` at every voxel, and nnU-Net's predictor
receives them as the logits of their classes. Classes a stage has no query for get ``ABSENT_LOGIT``.

Background and the anomaly score (eq. 14): the organ queries include one for nnU-Net's background (label 0), which
gives the segmentation its background channel; the anomaly score is the negative max over the other organ queries
only (``anomaly.organ_queries``), since the background query claims every unlabelled voxel, an unseen organ's too.
Stage 2's anomaly map comes from the organ queries as the kMMM decoder leaves them, before their self-attention with
the tumour queries (``DSMDecoded.organ_masks``): not from the mixed organ queries, which the tumour classes' loss
teaches that the anomalies of training belong to a class.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffusion.architectures.dsm.anomaly import anomaly_score, organ_queries, prompt_attention_bias
from nnunet_diffusion.architectures.dsm.backbone import SwinUNETRPixelDecoder, UNetPixelDecoder
from nnunet_diffusion.architectures.dsm.feature_diffusion import GuidedFeatureDiffusion
from nnunet_diffusion.architectures.dsm.kmmm import KMeansMaskMambaLayer
from nnunet_diffusion.architectures.dsm.text_alignment import TextAlignedClassifier

ABSENT_LOGIT = -30.0  # a class without a query in this stage: never the argmax, sigmoid ~ 1e-13


class DSMOutput(NamedTuple):
    """logits: (B, N, *S) per class (N = all classes of the dataset); responses: per kMMM layer (B, K, *S_l) the organ
    queries' response logits (deep supervision); class_logits: (B, Q, N_text) every query's class logits (eq. 20,
    or a linear head without text), Q = the stage's queries in ``query_classes`` order; anomaly: (B, *S) the
    normalised anomaly score (eq. 14) of organ_masks; organ_masks: (B, K, *S) the mask logits of the organ queries as
    the kMMM decoder leaves them (stage 1: the final organ masks; stage 2: before the tumour queries mix in)."""
    logits: torch.Tensor
    responses: list
    class_logits: torch.Tensor
    anomaly: torch.Tensor
    organ_masks: torch.Tensor


class DSMDecoded(NamedTuple):
    """What ``decode`` gives: queries (B, Q, D) in ``query_classes`` order, their mask logits (B, Q, *S), the kMMM
    responses per layer, and the kMMM organ queries' mask logits (B, K, *S), the source of the anomaly score."""
    queries: torch.Tensor
    masks: torch.Tensor
    responses: list
    organ_masks: torch.Tensor


def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def masks_from_queries(queries: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) queries, (B, D, *S) pixel embedding -> (B, Q, *S) mask logits."""
    return torch.einsum("bqd,bd...->bq...", queries, pixels.to(queries.dtype))


class DSMNetwork(nn.Module):
    """Stage 1. Args: image_channels; num_classes (N, all classes of the dataset); organ_classes: the class indices
    the organ queries stand for (background first); the plans' U-Net arguments; text_dim: D of the class text
    embeddings (``text_embeddings`` buffer, (N, D_t), filled by the trainer) or None for a linear class head (the
    no-text ablation); dim: query width; max_layers: kMMM layers on the finest scales allowed (the paper: 4);
    min_output_stride: none on a finer scale (the paper: output strides 32 .. 4; 1: every scale but the
    full-resolution one, as before); kmeans: False for the MaskFormer ablation; ssm_state: N of the kMMM layers' SSM
    state; backbone: 'unet' (the plans' U-Net) or 'swin_unetr' (MONAI's);
    legacy_anomaly: True for models trained before eq. 14 left the background query out (their plans.json has no
    'anomaly' setting): the max then runs over all organ queries, as they were trained."""

    def __init__(self, image_channels: int, num_classes: int, organ_classes: Sequence[int], *, text_dim: Optional[int],
                 dim: int = 64, max_layers: int = 4, kmeans: bool = True, ssm_state: int = 16, backbone: str = "unet",
                 min_output_stride: int = 1, legacy_anomaly: bool = False, **unet_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.organ_classes = list(organ_classes)
        # the background query stays for label 0's segmentation channel; eq. 14's max skips it (these positions)
        self.scored_queries = list(range(len(self.organ_classes))) if legacy_anomaly else \
            organ_queries(self.organ_classes)
        conv_op = unet_kwargs["conv_op"]
        if backbone == "unet":
            self.backbone = UNetPixelDecoder(image_channels, dim, **unet_kwargs)
        elif backbone == "swin_unetr":
            self.backbone = SwinUNETRPixelDecoder(image_channels, dim, 3 if conv_op is nn.Conv3d else 2)
        else:
            raise ValueError(f"backbone must be 'unet' or 'swin_unetr', got {backbone!r}")
        # the finest max_layers features at output stride >= min_output_stride (the coarsest one if none is)
        eligible = [i for i, stride in enumerate(self.backbone.feature_strides) if stride >= min_output_stride]
        self.feature_indices = (eligible or [0])[-max_layers:]
        channels = [self.backbone.feature_channels[i] for i in self.feature_indices]
        self.scales_used = len(channels)
        self.project = nn.ModuleList([conv_op(c, dim, 1) for c in channels])
        self.organ_queries = nn.Parameter(torch.randn(len(self.organ_classes), dim) * 0.02)
        self.layers = nn.ModuleList([KMeansMaskMambaLayer(dim, len(self.organ_classes), kmeans, ssm_state)
                                     for _ in channels])
        if text_dim is not None:
            self.register_buffer("text_embeddings", torch.zeros(num_classes, text_dim))
            self.classifier = TextAlignedClassifier(dim, text_dim)
        else:
            self.classifier = nn.Linear(dim, num_classes)

    def classify(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) -> (B, Q, N) class logits: eq. 20 against the class prompts, or the linear head."""
        if isinstance(self.classifier, TextAlignedClassifier):
            return self.classifier(queries, self.text_embeddings)
        return self.classifier(queries)

    def query_decoder(self, image: torch.Tensor):
        """-> organ queries (B, K, D), responses per layer (B, K, *S_l), projected features per layer (B, D, *S_l)
        coarse to fine, pixel embedding (B, D, *S)."""
        features, pixels = self.backbone(image)
        features = [project(features[i]) for project, i in zip(self.project, self.feature_indices)]
        queries = self.organ_queries.unsqueeze(0).expand(image.shape[0], -1, -1)
        responses = []
        for layer, feature in zip(self.layers, features):
            queries, response = layer(queries, feature)
            responses.append(response)
        return queries, responses, features, pixels

    def assemble(self, masks: dict, like: torch.Tensor) -> torch.Tensor:
        """{class index: (B, *S) logits} -> (B, N, *S), ABSENT_LOGIT for the classes without a query."""
        logits = torch.full((like.shape[0], self.num_classes, *like.shape[2:]), ABSENT_LOGIT, dtype=like.dtype,
                            device=like.device)
        for index, mask in masks.items():
            logits[:, index] = mask
        return logits

    def decode(self, image: torch.Tensor) -> DSMDecoded:
        """Stage 1: the organ queries are the kMMM decoder's, their masks are the organ masks."""
        queries, responses, _, pixels = self.query_decoder(image)
        masks = masks_from_queries(queries, pixels)
        return DSMDecoded(queries, masks, responses, masks)

    def anomaly(self, organ_masks: torch.Tensor) -> torch.Tensor:
        """(B, K, *S) organ mask logits -> (B, *S) eq. 14 over the organ queries, the background's left out."""
        return anomaly_score(organ_masks, self.scored_queries)

    @property
    def query_classes(self) -> list:
        return self.organ_classes

    def forward(self, image: torch.Tensor, full: bool = False):
        """(B, C_img, *S) -> logits (B, N, *S) (what nnU-Net's predictor calls), or with ``full`` a DSMOutput."""
        return forward_queries(self, self, image, full)


def forward_queries(network, stage1: DSMNetwork, image: torch.Tensor, full: bool):
    """The logits (or DSMOutput) of a DSM network from its ``decode``; ``stage1`` assembles and classifies."""
    queries, masks, responses, organ_masks = network.decode(image)
    logits = stage1.assemble(dict(zip(network.query_classes, masks.unbind(1))), masks)
    if not full:
        return logits
    return DSMOutput(logits, responses, stage1.classify(queries), stage1.anomaly(organ_masks), organ_masks)


def prompt_maps(network, image: torch.Tensor, prompt_text: torch.Tensor):
    """Classes named at prediction time (sec. 4.2.3): image (B, C_img, *S), prompt_text (E, D_t) embeddings of E
    prompts -> (logits (B, N, *S), maps (B, 1 + E, *S)): map 0 the anomaly score of the kMMM organ masks (eq. 14,
    the background query left out), map 1 + e the anomaly score times the sigmoid mask of the query whose projected
    embedding is most similar to prompt e (eq. 20's cosine). A structure no query was trained for is found by the
    anomaly score; the prompt picks the query (for stage 2 usually a tumour query, which attends to the anomalies)
    that delineates it."""
    stage1 = network.stage1 if isinstance(network, DSMStage2Network) else network
    if not isinstance(stage1.classifier, TextAlignedClassifier):
        raise ValueError("This DSM model was trained without text alignment (a _noText variant): classes cannot be "
                         "named by prompts. Use a model trained with text.")
    queries, masks, _, organ_masks = network.decode(image)
    anomaly = stage1.anomaly(organ_masks)  # (B, *S)
    best = stage1.classifier(queries, prompt_text).argmax(dim=1)  # (B, E): the most similar query per prompt
    chosen = torch.stack([masks[b, best[b]] for b in range(masks.shape[0])])  # (B, E, *S)
    maps = torch.cat([anomaly.unsqueeze(1), anomaly.unsqueeze(1) * torch.sigmoid(chosen.float())], dim=1)
    logits = stage1.assemble(dict(zip(network.query_classes, masks.unbind(1))), masks)
    return logits, maps


class ProjectionFusion(nn.Module):
    """Table 5's 'no DQR': the feature map through a 1x1 projection, fused with the upsampled deeper map."""

    def __init__(self, dim: int, conv_op):
        super().__init__()
        self.project = conv_op(dim, dim, 1)
        self.fuse = conv_op(2 * dim, dim, 1)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        upper = F.interpolate(guidance, size=features.shape[2:], mode="nearest")
        return self.fuse(torch.cat([self.project(features), upper], dim=1))


class DSMStage2Network(nn.Module):
    """Stage 2: the stage-1 network (``stage1``, loaded from its checkpoint) plus tumour queries for
    ``tumour_classes``, refined per scale: features enhanced by guided diffusion (DQR, eqs. 16-18, guided by the
    next coarser map), attention of the tumour queries to them biased by the anomaly prompt of the organ responses
    at that scale (AMVP, eqs. 14-15, 19; the background query left out), then self-attention among organ and
    tumour queries. The anomaly map of the output comes from the kMMM organ queries, before any mixing.
    amvp=False: the anomaly score concatenated to the features instead of the prompt bias; dqr=False: a projection
    layer instead of the diffusion (Table 5); legacy_anomaly: the output's anomaly map from the mixed organ queries,
    as models trained before (plans.json without an 'anomaly' setting) gave it."""

    def __init__(self, stage1: DSMNetwork, tumour_classes: Sequence[int], conv_op, heads: int = 8,
                 amvp: bool = True, dqr: bool = True, legacy_anomaly: bool = False):
        super().__init__()
        self.stage1 = stage1
        self.legacy_anomaly = legacy_anomaly
        self.tumour_classes = list(tumour_classes)
        self.amvp, self.heads = amvp, heads
        dim = stage1.organ_queries.shape[1]
        n = stage1.scales_used
        self.tumour_queries = nn.Parameter(torch.randn(len(self.tumour_classes), dim) * 0.02)
        self.enhance = nn.ModuleList([GuidedFeatureDiffusion(dim, dim, conv_op) if dqr else ProjectionFusion(dim, conv_op)
                                      for _ in range(n)])
        self.with_score = nn.ModuleList([nn.Identity() if amvp else conv_op(dim + 1, dim, 1) for _ in range(n)])
        self.cross = nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(n)])
        self.mix = nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(n)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2 * n)])

    @property
    def query_classes(self) -> list:
        return self.stage1.organ_classes + self.tumour_classes

    def decode(self, image: torch.Tensor) -> DSMDecoded:
        """DSMNetwork.decode with the tumour queries after the organ queries; organ_masks from the kMMM organ
        queries before they mix with the tumour queries."""
        organ, responses, features, pixels = self.stage1.query_decoder(image)
        organ_masks = masks_from_queries(organ, pixels)
        tumour = self.tumour_queries.unsqueeze(0).expand(image.shape[0], -1, -1)
        for level, feature in enumerate(features):
            guidance = features[max(level - 1, 0)]  # the next coarser map (the coarsest guides itself)
            enhanced = self.enhance[level](feature, guidance)
            score = anomaly_score(responses[level], self.stage1.scored_queries)  # (B, *S_l)
            bias = None
            if self.amvp:  # (B * heads, T, P): the same bias for every head and tumour query
                bias = prompt_attention_bias(score).to(enhanced.dtype)[:, None, :]
                bias = bias.expand(-1, tumour.shape[1], -1).repeat_interleave(self.heads, dim=0)
            else:
                enhanced = self.with_score[level](torch.cat([enhanced, score.unsqueeze(1).to(enhanced.dtype)], 1))
            keys = tokens(enhanced)
            attended, _ = self.cross[level](tumour, keys, keys, attn_mask=bias, need_weights=False)
            tumour = self.norms[2 * level](tumour + attended)
            queries = torch.cat([organ, tumour], dim=1)
            mixed, _ = self.mix[level](queries, queries, queries, need_weights=False)
            queries = self.norms[2 * level + 1](queries + mixed)
            organ, tumour = queries[:, :organ.shape[1]], queries[:, organ.shape[1]:]
        queries = torch.cat([organ, tumour], dim=1)
        masks = masks_from_queries(queries, pixels)
        if self.legacy_anomaly:
            organ_masks = masks[:, :organ.shape[1]]
        return DSMDecoded(queries, masks, responses, organ_masks)

    def forward(self, image: torch.Tensor, full: bool = False):
        return forward_queries(self, self.stage1, image, full)
