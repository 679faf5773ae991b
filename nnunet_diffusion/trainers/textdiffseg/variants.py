"""TextDiffSeg ablations (Table II) and choices measured against the full model; each changes one thing."""
from __future__ import annotations

from dataclasses import replace

from nnunet_diffusion.trainers.textdiffseg.trainer import nnUNetTrainerTextDiffSeg

__all__ = ["nnUNetTrainerTextDiffSeg_concatFusion", "nnUNetTrainerTextDiffSeg_downsampleImage",
           "nnUNetTrainerTextDiffSeg_reduceLabels", "nnUNetTrainerTextDiffSeg_noText",
           "nnUNetTrainerTextDiffSeg_pretrainedLabelAE", "nnUNetTrainerTextDiffSeg_x0",
           "nnUNetTrainerTextDiffSeg_noReconstructionLoss", "nnUNetTrainerTextDiffSeg_reconstructionLossOnly",
           "nnUNetTrainerTextDiffSeg_recycled", "nnUNetTrainerTextDiffSeg_x0_recycled",
           "nnUNetTrainerTextDiffSeg_scaledLinear", "nnUNetTrainerTextDiffSeg_sampledTimesteps",
           "nnUNetTrainerTextDiffSeg_scaledLinear_sampledTimesteps", "nnUNetTrainerTextDiffSeg_clippedEstimates",
           "nnUNetTrainerTextDiffSeg_cosine",
           "nnUNetTrainerTextDiffSeg_exactEstimateGradient", "nnUNetTrainerTextDiffSeg_standardisedEstimates",
           "nnUNetTrainerTextDiffSeg_lambda1", "nnUNetTrainerTextDiffSeg_lambda1en1",
           "nnUNetTrainerTextDiffSeg_labelFeatures8"]


_FULL = nnUNetTrainerTextDiffSeg.options


class nnUNetTrainerTextDiffSeg_concatFusion(nnUNetTrainerTextDiffSeg):
    """zeta_1: the class embeddings concatenated to the image features instead of the cross-attention of eq. 2."""
    options = replace(_FULL, text_fusion="concat")


class nnUNetTrainerTextDiffSeg_downsampleImage(nnUNetTrainerTextDiffSeg):
    """zeta_2: average pooling to the latent grid instead of the image encoder."""
    options = replace(_FULL, image_branch="downsample")


class nnUNetTrainerTextDiffSeg_reduceLabels(nnUNetTrainerTextDiffSeg):
    """zeta_3: a fixed pooling + projection instead of the learned label encoder (the decoder still learns)."""
    options = replace(_FULL, label_encoder="reduction")


class nnUNetTrainerTextDiffSeg_noText(nnUNetTrainerTextDiffSeg):
    """Learned class tokens in place of the prompts' embeddings: what the text itself adds."""
    options = replace(_FULL, text_source="learned")


class nnUNetTrainerTextDiffSeg_pretrainedLabelAE(nnUNetTrainerTextDiffSeg):
    """The label autoencoder trained alone for the first 20% of training, then frozen (instead of eq. 6's joint
    training)."""
    options = replace(_FULL, label_autoencoder_training="pretrained")


class nnUNetTrainerTextDiffSeg_x0(nnUNetTrainerTextDiffSeg):
    """The denoiser predicts the clean latent instead of the noise (as nnUNetTrainerDiffusion_x0 does in mask
    space, where eps models collapsed when sampling from pure noise)."""
    prediction = "x0"


class nnUNetTrainerTextDiffSeg_noReconstructionLoss(nnUNetTrainerTextDiffSeg):
    """Eq. 4's L1 on the decoded denoised latent only (the paper's loss as written), without the added
    reconstruction term on the decoded ground-truth latent."""
    options = replace(_FULL, segmentation_loss="denoised")


class nnUNetTrainerTextDiffSeg_reconstructionLossOnly(nnUNetTrainerTextDiffSeg):
    """L1 on the decoded ground-truth latent only (this trainer before the denoised term): the segmentation loss
    never reaches the denoiser, only the MSE of eq. 5 does."""
    options = replace(_FULL, segmentation_loss="reconstruction")



class nnUNetTrainerTextDiffSeg_recycled(nnUNetTrainerTextDiffSeg):
    """Trained as sampled: each draw's z_t is the model's own z0 estimate from z_{T-1}, noised to t (the recycling
    paper's train/test alignment), its targets pointing at the ground truth (eps: Min-SNR-5 weighted)."""
    options = replace(_FULL, training_input="recycled")


class nnUNetTrainerTextDiffSeg_x0_recycled(nnUNetTrainerTextDiffSeg_x0):
    """_x0 trained as sampled (as nnUNetTrainerDiffSegRecycling trains in mask space)."""
    options = replace(_FULL, training_input="recycled")


class nnUNetTrainerTextDiffSeg_scaledLinear(nnUNetTrainerTextDiffSeg):
    """The latent diffusion schedule of Latent Diffusion Models (the paper's [12]; sqrt(beta) linear from 0.00085 to
    0.012) instead of DDPM's linear betas: the paper names no schedule; 10 DDIM steps then start at SNR 0.0047, not
    4e-5, and 4 of them (not 3) above SNR 1."""
    noise_schedule = "scaled_linear"


class nnUNetTrainerTextDiffSeg_sampledTimesteps(nnUNetTrainerTextDiffSeg):
    """Trained on the 10 timesteps its DDIM sampler visits (0, 111, ..., 999: the 1000-step schedule respaced, as
    recycling trains on its 5), not on all 1000: each draw is a step the sampler takes, the first one (pure noise)
    1 draw in 10 instead of 1 in 1000. The sampler can then run 10, 4 or 2 steps."""
    beta_schedule_steps = 1000
    num_train_timesteps = 10


class nnUNetTrainerTextDiffSeg_scaledLinear_sampledTimesteps(nnUNetTrainerTextDiffSeg_sampledTimesteps):
    """_sampledTimesteps on the latent diffusion schedule (_scaledLinear)."""
    noise_schedule = "scaled_linear"


class nnUNetTrainerTextDiffSeg_standardisedEstimates(nnUNetTrainerTextDiffSeg):
    """The sampler standardises each x0 estimate of the latent (mean 0, std 1 per sample) and clips it to +-5,
    instead of projecting it onto the latent of its label map (this trainer's sampler before; training is the
    same)."""
    options = replace(_FULL, sampled_estimate="standardised")


class nnUNetTrainerTextDiffSeg_clippedEstimates(nnUNetTrainerTextDiffSeg):
    """The sampler clips each x0 estimate of the latent to +-5, neither standardised nor projected (this trainer's
    sampler before 2026-12-02; training is the same)."""
    options = replace(_FULL, sampled_estimate="clipped")


class nnUNetTrainerTextDiffSeg_cosine(nnUNetTrainerTextDiffSeg):
    """The cosine schedule (Nichol & Dhariwal) of LDSeg, the paper's [19], whose q_t(z_t | y, X) ~ N(z_dn, sigma^2 I)
    the paper quotes: the paper names no schedule; 10 DDIM steps then have 5 (not 3) above SNR 1."""
    noise_schedule = "cosine"


class nnUNetTrainerTextDiffSeg_exactEstimateGradient(nnUNetTrainerTextDiffSeg):
    """Eq. 4's L1 reaches eps_hat through the x0 estimate's exact gradient, -sqrt(1 / abar - 1) (156 at t = 999),
    not capped at 1 where SNR < 1: the draws near pure noise, where the sampler's first estimate reads the image
    alone, weigh as much in the estimate as an x0 model's."""
    # lambda = 1, as it was measured (0.692, results_cpu_textdiffseg_exact_gradient.md): at the default's 0.3 the x0
    # estimate's amplified term (1 / sqrt(abar), 156 at t = 999) dominates the gradient, which under float16 autocast
    # was 5.5% off float32 (tests/architectures/test_half_precision.py bounds it at 5%)
    options = replace(_FULL, denoised_latent="x0_estimate_exact", eps_loss_weight=1.0)


class nnUNetTrainerTextDiffSeg_lambda1(nnUNetTrainerTextDiffSeg):
    """Eq. 6 with lambda = 1 (the default before 2026-12-04): the eps MSE weighs as much as the segmentation loss."""
    options = replace(_FULL, eps_loss_weight=1.0)


class nnUNetTrainerTextDiffSeg_lambda1en1(nnUNetTrainerTextDiffSeg):
    """Eq. 6 with lambda = 0.1: the eps MSE weighs a tenth of the segmentation loss L1."""
    options = replace(_FULL, eps_loss_weight=0.1)


class nnUNetTrainerTextDiffSeg_labelFeatures8(nnUNetTrainerTextDiffSeg):
    """The label autoencoder at half the channels (8, 16 instead of 16, 32): a quarter of its convolutions' cost."""
    options = replace(_FULL, label_autoencoder_features=(8, 16))
