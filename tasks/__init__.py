"""Prefect tasks that wrap the pipeline's DVC stages."""
