"""The MLflow side: tracking, lineage, the store, packaging and the model registry."""
