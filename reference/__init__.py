"""difflower.reference: the eager PyTorch golden source (models, loading, schedulers, pipeline)."""
