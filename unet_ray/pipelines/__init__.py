"""Layer 5: the jobs (prepare and training data, the training loop and its driver, tune, evaluate, segment, whole slides)."""
