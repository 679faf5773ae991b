"""DSMOptions: what a DSM model is (stored in plans.json's 'dsm' block beside its classes and class text)."""
from __future__ import annotations

from dataclasses import dataclass

from nnunet_diffusion.architectures.options import StoredOptions


@dataclass(frozen=True)
class DSMOptions(StoredOptions):
    """The query decoder, the backbone and stage 2's two blocks; the paper's Table 5 ablations change one each."""
    query_dim: int = 64           # the paper does not give the query width; 64 keeps the decoder light beside the U-Net
    max_kmmm_layers: int = 4      # the paper: 4 kMMM layers (output strides 32 .. 4)
    kmeans: bool = True           # False: MaskFormer's cross-attention, no SSM (Table 5, no kMMM)
    text_alignment: bool = True   # False: a linear class head (Table 5, no CLIP)
    backbone: str = "unet"        # 'swin_unetr': MONAI's SwinUNETR, the paper's (patch axes divisible by 32)
    amvp: bool = True             # stage 2: the anomaly map biases the tumour queries' attention (False: concatenated)
    dqr: bool = True              # stage 2: diffusion-guided query refinement (False: a projection layer)
    # N of each kMMM layer's SSM state per channel; the paper does not give it. 4, chosen for cost (issue 22): the
    # scan's state is (B, voxels, 2K, N), the SSM at the finest kMMM scale was a fifth of a stage-1 step at Mamba's
    # default 16 (nnUNetTrainerDSM_ssmState16, and what a plans.json without the setting keeps)
    ssm_state: int = 4
    # the finest output stride of a kMMM (and stage 2's DQR) layer: the paper's layers process "image features with
    # output strides of 32, 16, 8, and 4" (sec. 5.3), so none finer than 4. 1 (every scale but the full-resolution
    # one, nnUNetTrainerDSM_minOutputStride1) was the default before 2026-12-06, and what a plans.json without it keeps
    min_output_stride: int = 4

    @classmethod
    def legacy_values(cls) -> dict:
        # models from before each setting: Mamba's default state size, a kMMM layer at every scale but the finest
        return {"ssm_state": 16, "min_output_stride": 1}

    @classmethod
    def from_stored(cls, block: dict) -> "DSMOptions":
        # a block from before 'text_alignment' was stored: a model without text alignment stored no class text
        legacy = {} if "text_alignment" in block else {"text_alignment": block.get("text") is not None}
        return super().from_stored({**block, **legacy})
