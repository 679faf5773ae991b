"""TextDiffSeg's networks ("TextDiffSeg: Text-guided Latent Diffusion Model for 3d Medical Images Segmentation"):
label autoencoder, image encoder, text fusion
and the latent denoiser, assembled in ``network.TextDiffSegDenoiser``."""
