"""UniSegDiff (``trainer``) and its ablations (``variants``)."""
