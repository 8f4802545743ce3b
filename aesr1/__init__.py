"""aesr1: Aes-R1 (aesthetic critique + calibrated score) as a reproducible pipeline."""

__version__ = "0.1.0"
