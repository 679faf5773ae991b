"""nnunet-diffusion: diffusion-model segmentation trainers for nnU-Net v2."""
