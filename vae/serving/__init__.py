"""What consumers run on the core install: load a registered model, encode, sample, Spark."""
