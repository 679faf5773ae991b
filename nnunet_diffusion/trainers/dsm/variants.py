"""DSM ablations (Table 5); each changes one thing. A stage-2 ablation starts from the matching stage-1 model."""
from __future__ import annotations

from dataclasses import replace

from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM, nnUNetTrainerDSMStage2

__all__ = ["nnUNetTrainerDSM_noKMMM", "nnUNetTrainerDSM_noText", "nnUNetTrainerDSMStage2_noKMMM",
           "nnUNetTrainerDSMStage2_noAMVP", "nnUNetTrainerDSMStage2_noDQR", "nnUNetTrainerDSMStage2_noText",
           "nnUNetTrainerDSM_swinUNETR", "nnUNetTrainerDSMStage2_swinUNETR", "nnUNetTrainerDSM_ssmState16",
           "nnUNetTrainerDSMStage2_ssmState16", "nnUNetTrainerDSM_minOutputStride1",
           "nnUNetTrainerDSMStage2_minOutputStride1"]

_FULL = nnUNetTrainerDSM.options


class nnUNetTrainerDSM_noKMMM(nnUNetTrainerDSM):
    """MaskFormer's spatial-softmax cross-attention instead of the k-means argmax, no SSM."""
    options = replace(_FULL, kmeans=False)


class nnUNetTrainerDSM_noText(nnUNetTrainerDSM):
    """A linear class head instead of the alignment with the class prompts' text embeddings (eq. 20)."""
    options = replace(_FULL, text_alignment=False)


class nnUNetTrainerDSMStage2_noKMMM(nnUNetTrainerDSMStage2):
    stage1_trainer = "nnUNetTrainerDSM_noKMMM"
    options = replace(_FULL, kmeans=False)


class nnUNetTrainerDSMStage2_noAMVP(nnUNetTrainerDSMStage2):
    """The anomaly score concatenated to the features instead of biasing the tumour queries' attention."""
    options = replace(_FULL, amvp=False)


class nnUNetTrainerDSMStage2_noDQR(nnUNetTrainerDSMStage2):
    """A projection layer fused with the coarser map instead of the diffusion-guided enhancement."""
    options = replace(_FULL, dqr=False)


class nnUNetTrainerDSMStage2_noText(nnUNetTrainerDSMStage2):
    stage1_trainer = "nnUNetTrainerDSM_noText"
    options = replace(_FULL, text_alignment=False)


class nnUNetTrainerDSM_swinUNETR(nnUNetTrainerDSM):
    """The paper's backbone: MONAI's SwinUNETR instead of the plans' U-Net (patch axes divisible by 32)."""
    options = replace(_FULL, backbone="swin_unetr")


class nnUNetTrainerDSMStage2_swinUNETR(nnUNetTrainerDSMStage2):
    stage1_trainer = "nnUNetTrainerDSM_swinUNETR"
    options = replace(_FULL, backbone="swin_unetr")


class nnUNetTrainerDSM_ssmState16(nnUNetTrainerDSM):
    """Mamba's default SSM state size (16) in the kMMM layers, the default before 2026-12-05 (slower per
    iteration: benchmarks/results_cpu_cost_levers.md)."""
    options = replace(_FULL, ssm_state=16)


class nnUNetTrainerDSMStage2_ssmState16(nnUNetTrainerDSMStage2):
    stage1_trainer = "nnUNetTrainerDSM_ssmState16"
    options = replace(_FULL, ssm_state=16)


class nnUNetTrainerDSM_minOutputStride1(nnUNetTrainerDSM):
    """kMMM layers down to the finest decoder scale (output stride 2 on the example's 2d plan), not only the
    paper's strides 32 .. 4: the default before 2026-12-06 (benchmarks/results_cpu_min_output_stride.md)."""
    options = replace(_FULL, min_output_stride=1)


class nnUNetTrainerDSMStage2_minOutputStride1(nnUNetTrainerDSMStage2):
    stage1_trainer = "nnUNetTrainerDSM_minOutputStride1"
    options = replace(_FULL, min_output_stride=1)
