"""Training and evaluating point detectors (mitosis): probability maps scored on annotated points."""
