"""Prefect orchestration over the DVC pipeline (see ``pipelines.flows``).

``vae-pipeline`` runs the stages of ``dvc.yaml`` one Prefect task each; ``vae-retrain`` reruns
them when the data changed and leaves the promotion to the registry's gate. ``python -m
pipelines.serve`` serves both, the retraining on the cron schedule of ``params.yaml``. Nothing
here does maths or reads a file format: tasks call DVC or the ``vae`` library.
"""
