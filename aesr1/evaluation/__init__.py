"""Evaluation: the evaluate stage, its plots and its report."""
