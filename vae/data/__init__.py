"""Data: the raw sources, the prepared splits, and the images a user hands in."""
