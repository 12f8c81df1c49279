"""A reproducible, pipeline-orchestrated variational autoencoder."""

__version__ = "0.1.0"
