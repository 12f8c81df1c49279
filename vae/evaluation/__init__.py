"""Evaluation: likelihood bounds, embeddings and their probes, samples, and sample quality."""
