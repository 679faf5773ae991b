"""Cross-Timestep (``trainer``) and its ablations (``variants``)."""
