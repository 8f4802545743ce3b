"""Prefect flows over the pipeline's DVC stages."""
