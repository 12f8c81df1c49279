"""Training: the loop, its run state and callbacks, checkpoints, EMA, numerics and devices."""
