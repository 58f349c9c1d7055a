"""Evaluation: image-quality metrics, BD-rate, and (elsewhere in this package) LVLM tasks."""
