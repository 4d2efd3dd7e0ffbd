"""Building blocks shared by the models: attention over the paged cache, rotary, norms, MLPs."""
