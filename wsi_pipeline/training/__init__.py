"""Training data and augmentation (the `train` command builds on these)."""
