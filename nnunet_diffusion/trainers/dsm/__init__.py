"""DSM's two stages (``trainer``) and their ablations (``variants``)."""
