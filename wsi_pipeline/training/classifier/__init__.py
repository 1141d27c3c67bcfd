"""Training and evaluating tile classifiers and class-map (U-Net) networks."""
