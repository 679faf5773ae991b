"""TextDiffSeg's networks (``../shared/papers/textdiffseg.txt``): label autoencoder, image encoder, text fusion
and the latent denoiser, assembled in ``network.TextDiffSegDenoiser``."""
