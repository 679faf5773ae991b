"""TextDiffSegOptions: what a TextDiffSeg model is (stored in plans.json as the 'textdiffseg' block)."""
from __future__ import annotations

from dataclasses import dataclass

from nnunet_diffusion.architectures.options import StoredOptions


@dataclass(frozen=True)
class TextDiffSegOptions(StoredOptions):
    """The network, its loss and how the label autoencoder trains; the paper's Table II ablations change one each."""
    # k: the paper only says k << N. 4 channels code up to 2^4 = 16 classes by sign pattern per latent voxel
    latent_channels: int = 4
    # the latent grid skips the plans' first 2 downsamplings (4x per pooled axis): the paper gives no stride;
    # LDSeg's 16x left a 40^3 patch 3 latent voxels wide, 4x keeps 10
    latent_downsamplings: int = 2
    # channels of the label autoencoder's stages (stem, then one per latent downsampling; the last doubles beyond):
    # the paper says only "a lightweight label encoder". Variant: _labelFeatures8 (8, 16)
    label_autoencoder_features: tuple = (16, 32)
    image_branch: str = "encoder"     # 'downsample': Table II zeta_2
    text_fusion: str = "attention"    # 'concat': Table II zeta_1
    label_encoder: str = "learned"    # 'reduction': Table II zeta_3
    text_source: str = "prompts"      # 'learned': class tokens instead of text (how much does text add?)
    # 'joint' (eq. 6, end to end) or 'pretrained': the label autoencoder trains alone for the first part of
    # training, then is frozen. Chosen by measurement: docs/methods/textdiffseg.md
    label_autoencoder_training: str = "joint"
    # eq. 4's L1 on the labels decoded from the denoised latent z_dn ("q_t(z_t | y, X) ~ N(z_dn, sigma^2 I)"), plus
    # the same loss on the decoded ground-truth latent: it trains the decoder on exact clean latents (where the
    # sampler ends) and is, for x0 models, the encoder's only segmentation signal (z0 enters them only as input and
    # MSE target; a label-blind latent would satisfy both). 'denoised': the paper's L1 alone; 'reconstruction':
    # before z_dn was decoded in training. Variants: _noReconstructionLoss, _reconstructionLossOnly
    segmentation_loss: str = "denoised+reconstruction"
    # an eps model's z_dn: the clipped x0 estimate, what DDIM steps through and ends on, its gradient capped where
    # SNR < 1 ('z_t_minus_eps': LDSeg's z_t - eps_hat, which under eq. 3's scaling estimates z0 at no t).
    # segmenter.DENOISED_LATENTS
    denoised_latent: str = "x0_estimate"
    # a training draw's z_t: 'q_sample', the noised ground-truth latent (eq. 3, the paper's); 'recycled', the model's
    # own z0 estimate from z_{T-1} noised to t, as the sampler's later steps see it (segmenter.TRAINING_INPUTS).
    # Variant: _recycled
    training_input: str = "q_sample"
    # what the sampler does with each x0 estimate of the latent (the paper says nothing): 'projected', replaced by the
    # latent of the label map it decodes to (decoded to class probabilities, re-encoded; the last estimate is the
    # model's own), as Diffusion-LM clamps each estimate of a discrete token to its embedding: an eps model's early
    # estimates lie far from every latent the label encoder makes, and DDIM would carry them on. 'standardised': mean 0 and std 1 per
    # sample, as the label encoder's final normalisation makes every true latent ("label embeddings follow a
    # standardized distribution"), then the +-5 clip; 'clipped': the clip alone. Measured:
    # results_cpu_textdiffseg_estimates*.md. Variants: _standardisedEstimates, _clippedEstimates
    # (segmenter.SAMPLED_ESTIMATES)
    sampled_estimate: str = "projected"
    # lambda of eq. 6, L = L1 + lambda L2: the paper gives no value ("lambda controls the influence of L2", the eps
    # MSE that "regularizes the latent space"). 0.3 by measurement, mean of 3 sampler seeds: 0.796 against 1's 0.756
    # and 0.1's 0.774 (results_cpu_textdiffseg_lambda.md); 0.793 for both 0.3 and 1 in a second run
    # (results_cpu_defaults_lambda.md). Variants: _lambda1 (the default before), _lambda1en1
    eps_loss_weight: float = 0.3

    @classmethod
    def legacy_values(cls) -> dict:
        # a plans.json from before the denoised term: the loss that model trained with (reconstruction only)
        # and the sampler before standardised estimates (the clip alone)
        # and lambda = 1, which every model before the setting trained with (--c keeps it)
        return {"segmentation_loss": "reconstruction", "sampled_estimate": "clipped", "eps_loss_weight": 1.0}
