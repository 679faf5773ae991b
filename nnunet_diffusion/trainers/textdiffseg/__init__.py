"""TextDiffSeg (``trainer``) and its ablations (``variants``)."""
