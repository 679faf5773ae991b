"""DSM's networks ("Unleashing Diffusion and State Space Models for Medical Image Segmentation").
Built so far: the selective state-space layer
(``ssm.py``), the kMMM block (``kmmm.py``), the anomaly prompt (``anomaly.py``), guided feature diffusion
(``feature_diffusion.py``) and text alignment (``text_alignment.py``); the decoders, the network and the trainers are
still to come (issue 9)."""
