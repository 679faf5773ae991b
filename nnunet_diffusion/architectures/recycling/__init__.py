"""The recycling method's network: one U-Net on [image, noisy mask] (``network``)."""
