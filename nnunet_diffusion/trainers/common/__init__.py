"""What every trainer shares: the package base, the diffusion base, run lengths, fault safety, start-up checks, class
text, pre-training phases, pre-trained condition networks and the optimiser variants."""
