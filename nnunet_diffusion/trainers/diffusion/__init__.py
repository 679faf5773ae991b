"""The plain image-conditioned DDPM (``trainer``) and its variants."""
