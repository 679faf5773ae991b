"""Recycling for DDPM segmentation (``trainer``) and its variants."""
