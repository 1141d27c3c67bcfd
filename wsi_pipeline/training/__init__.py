"""Making models: `train` and `evaluate` as functions (`commands`), their settings, the training loop, metrics,
cross-source studies and publishing; `data/` reads labelled data, `classifier/` and `detector/` train and evaluate
each kind of model."""
