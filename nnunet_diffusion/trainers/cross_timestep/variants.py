"""Cross-Timestep ablations (the paper's Tables 1 and 3, and APDS off for the collapse curve).

Each variant changes ``options`` (or one training setting). Where the paper names a unit, it is swapped in;
'no memory' keeps the same blocks but resets their state at every step.
"""
from dataclasses import replace

from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep

_FULL = nnUNetTrainerCrossTimestep.options

__all__ = ["nnUNetTrainerCrossTimestep_noTLSTM", "nnUNetTrainerCrossTimestep_plainLSTM",
           "nnUNetTrainerCrossTimestep_ConvTLSTMOnly", "nnUNetTrainerCrossTimestep_LinearTGRUOnly",
           "nnUNetTrainerCrossTimestep_noTimeCell", "nnUNetTrainerCrossTimestep_APDSOnly",
           "nnUNetTrainerCrossTimestep_APDS_SC", "nnUNetTrainerCrossTimestep_APDS_FFT",
           "nnUNetTrainerCrossTimestep_noAPDS", "nnUNetTrainerCrossTimestep_convRA",
           "nnUNetTrainerCrossTimestep_fullChainGradient", "nnUNetTrainerCrossTimestep_eps",
           "nnUNetTrainerCrossTimestep_burnIn", "nnUNetTrainerCrossTimestep_linearFFTGate",
           "nnUNetTrainerCrossTimestep_heInit", "nnUNetTrainerCrossTimestep_residualRA",
           "nnUNetTrainerCrossTimestep_reverseAttention", "nnUNetTrainerCrossTimestep_broadcastSC",
           "nnUNetTrainerCrossTimestep_chain4", "nnUNetTrainerCrossTimestep_deepSupervision",
           "nnUNetTrainerCrossTimestep_deepCache", "nnUNetTrainerCrossTimestep_unroll2",
           "nnUNetTrainerCrossTimestep_unroll1", "nnUNetTrainerCrossTimestep_warmState1",
           "nnUNetTrainerCrossTimestep_checkpointEveryLevel", "nnUNetTrainerCrossTimestep_checkpointLevels1"]


class nnUNetTrainerCrossTimestep_noTLSTM(nnUNetTrainerCrossTimestep):
    """No memory across timesteps: SC and FFT blocks with their state reset every step."""
    options = replace(_FULL, carry_spatial=False, carry_channel=False)


class nnUNetTrainerCrossTimestep_plainLSTM(nnUNetTrainerCrossTimestep):
    """Table 1, 'LSTM': plain LSTMs (per-voxel and linear), no time modulation."""
    options = replace(_FULL, spatial_cell="lstm", channel_cell="lstm", time_cell=False)


class nnUNetTrainerCrossTimestep_ConvTLSTMOnly(nnUNetTrainerCrossTimestep):
    """Table 1, 'Conv-LSTM': memory in the Conv-tLSTM (spatial, FFT) only; channel branch without memory."""
    options = replace(_FULL, carry_channel=False)


class nnUNetTrainerCrossTimestep_LinearTGRUOnly(nnUNetTrainerCrossTimestep):
    """Table 1, 'Linear-GRU': memory in the Linear-tGRU (channel branch) only."""
    options = replace(_FULL, carry_spatial=False)


class nnUNetTrainerCrossTimestep_noTimeCell(nnUNetTrainerCrossTimestep):
    """Table 1, Conv-LSTM + Linear-GRU without the 't-cell' (no time modulation of h_{t-1})."""
    options = replace(_FULL, time_cell=False)


class nnUNetTrainerCrossTimestep_APDSOnly(nnUNetTrainerCrossTimestep):
    """Table 3, APDS only: neither SC-tLSTM nor FFT-tLSTM."""
    options = replace(_FULL, sc=False, fft=False)


class nnUNetTrainerCrossTimestep_APDS_SC(nnUNetTrainerCrossTimestep):
    """Table 3, APDS + SC-tLSTM."""
    options = replace(_FULL, fft=False)


class nnUNetTrainerCrossTimestep_APDS_FFT(nnUNetTrainerCrossTimestep):
    """Table 3, APDS + FFT-tLSTM."""
    options = replace(_FULL, sc=False)


class nnUNetTrainerCrossTimestep_noAPDS(nnUNetTrainerCrossTimestep):
    """APDS off (tLSTM on): the 'Diff + tLSTM' curve of the collapse analysis (Fig. 3)."""
    options = replace(_FULL, apds=False)


class nnUNetTrainerCrossTimestep_convRA(nnUNetTrainerCrossTimestep):
    """APDS RA block as one conv block on [F | F_prior] instead of the paper's reverse attention (the package's
    earlier default: Cross-Timestep checkpoints with 'fusions.*.refine.*' weights load with this trainer)."""
    options = replace(_FULL, ra="conv")


class nnUNetTrainerCrossTimestep_unroll2(nnUNetTrainerCrossTimestep):
    """The default before 2026-12-07: two unrolled steps with gradient from q(x_k0 | x0), the state empty at k0;
    the gradient between them through the state. Models stored under it rebuild with it from plans.json."""
    unroll_steps = 2
    chain_start = "noised_truth"


class nnUNetTrainerCrossTimestep_fullChainGradient(nnUNetTrainerCrossTimestep_unroll2):
    """Training chain with backpropagation through the chain's x_k as well as the recurrent state: two unrolled
    steps from the noised truth (a chain of one step has no x_k to backpropagate through), as measured."""
    chain_gradient = "full"


class nnUNetTrainerCrossTimestep_eps(nnUNetTrainerCrossTimestep_unroll2):
    """Eq. 19's reading: eps prediction (Min-SNR-weighted MSE per unrolled step): the package's default before the
    mask-predicting one (cross_timestep.py says why). Two unrolled steps from the noised truth, as measured."""
    prediction = "eps"


class nnUNetTrainerCrossTimestep_burnIn(nnUNetTrainerCrossTimestep):
    """Training chains from pure noise at the chain's first step: the steps before the drawn start run without
    gradient with the model's own x_k and the state carried, as at test time (the recycling paper's alignment)."""
    chain_start = "burn_in"
    unroll_steps = 2  # as measured (benchmarks/results_cpu_methods.md)


class nnUNetTrainerCrossTimestep_linearFFTGate(nnUNetTrainerCrossTimestep):
    """FFT-tLSTM gated by |F_c| / max |F_c| (the first reading; near the identity on real spectra)."""
    options = replace(_FULL, fft_gate="linear")


class nnUNetTrainerCrossTimestep_heInit(nnUNetTrainerCrossTimestep):
    """FFT-tLSTM and SC-tLSTM with nnU-Net's He init like the rest, not started as the identity (the paper gives
    no initialisation; this was the default before the identity start was measured)."""
    options = replace(_FULL, identity_start=False)


class nnUNetTrainerCrossTimestep_reverseAttention(nnUNetTrainerCrossTimestep):
    """APDS's RA block as the OpenReview notes write it, F * (1 - sigmoid(F_prior)), without the default's residual
    F +: at low t, where eq. 23's w_t is small, it scales every main-decoder feature down (measured worse:
    docs/methods/cross-timestep.md). The default before 2026-12-01; its models rebuild with it from plans.json."""
    options = replace(_FULL, ra="reverse_attention")


class nnUNetTrainerCrossTimestep_residualRA(nnUNetTrainerCrossTimestep):
    """The default since 2026-12-01 (APDS's RA in its residual form); the name stays for the benchmark rows and
    models trained under it."""


class nnUNetTrainerCrossTimestep_broadcastSC(nnUNetTrainerCrossTimestep):
    """SC-tLSTM's spatial cell on the axis summaries broadcast back to the patch (full resolution in every stage):
    the default before 2026-12-02, whose models rebuild with it from plans.json (sc_tlstm.py)."""
    options = replace(_FULL, spatial_summary="broadcast")


class nnUNetTrainerCrossTimestep_chain4(nnUNetTrainerCrossTimestep):
    """A 4-step DDIM chain (t = 999, 749, 499, 249) for training and prediction instead of 10: the per-case lever
    of the cost issue (4 network calls per window)."""
    default_sampler = SamplerSettings(kind="ddim", steps=4)


class nnUNetTrainerCrossTimestep_deepSupervision(nnUNetTrainerCrossTimestep):
    """nnU-Net's deep supervision on the denoiser's decoder heads at every unrolled step (trainers/common/
    deep_supervision.py); the paper's L_Dice + L_CE is on the output alone. Measured once on the second dataset,
    0.508 against the default's 0.344 at 200 s (benchmarks/results_cpu_deep_supervision_505.md)."""
    deep_supervision = True


class nnUNetTrainerCrossTimestep_deepCache(nnUNetTrainerCrossTimestep_unroll2):
    """DeepCache (issue 22's cost lever): every second step of a chain runs only the shallowest noise-encoder stage
    and the last decoder stage on the deep feature of the full step before it; training's unrolled pairs are (full,
    cached), as sampling alternates them. One stage: in 2d every stage of a U-Net costs about the same (a quarter
    of the voxels, twice the channels), so the shallow pair is the cheapest part to keep. Two unrolled steps from
    the noised truth, as measured: a pair needs two steps with gradient."""
    options = replace(_FULL, deep_cache_stages=1)


class nnUNetTrainerCrossTimestep_unroll1(nnUNetTrainerCrossTimestep):
    """One step of the chain per training draw from q(x_k0 | x0), without the default's warm-up step (a cost lever
    of issue 22).
    The recurrent state then always starts empty (zero) in training, so the cells' weights on h_{t-1} get a zero
    gradient and keep their initial values: the memory across timesteps is used at sampling but never trained.
    The paper is silent on how it trains the state; its Table 4 puts its training time at 1.14x Diff-UNet's."""
    unroll_steps = 1
    chain_start = "noised_truth"


class nnUNetTrainerCrossTimestep_warmState1(nnUNetTrainerCrossTimestep):
    """The default since 2026-12-07 under its benchmark name: one chain step with gradient per draw, after one step
    without gradient from q(x_{k0+1} | x0) that fills the recurrent state (chain_start 'warm_state'); the memory
    learns from a real previous step, as ``_unroll1``'s does not, for a forward pass without a graph instead of a
    second step with one."""


class nnUNetTrainerCrossTimestep_checkpointEveryLevel(nnUNetTrainerCrossTimestep):
    """Activation checkpointing (on CUDA, or NNUNET_DIFFUSION_ACTIVATION_CHECKPOINTING=always) of every stage, not
    only the finest levels: the least memory, one more forward of everything (the default before 2026-12-07)."""
    checkpoint_levels = None


class nnUNetTrainerCrossTimestep_checkpointLevels1(nnUNetTrainerCrossTimestep):
    """Activation checkpointing of the full-resolution stages only (and the FFT-tLSTM)."""
    checkpoint_levels = 1
