"""Cross-Timestep's networks: the denoiser (``network``), APDS, the tLSTM cells, SC-tLSTM, FFT-tLSTM and its
recurrent segmenter (``segmenter``)."""
