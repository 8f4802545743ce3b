"""Datasets: AesSynth generation, native annotation readers, the ingest stage."""
