"""DSM's networks (``../shared/papers/dsm_kmeans_mask_mamba.txt``). Built so far: the selective state-space layer
(``ssm.py``); the kMMM decoder, the anomaly prompt, DQR and the trainers are still to come (issue 9)."""
