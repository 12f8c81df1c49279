"""The team's store on real services: PostgreSQL, an S3 object store, MLflow and Prefect servers."""
