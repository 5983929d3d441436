"""Runnable examples: your own model, data and task through the pipeline (see docs/custom.md)."""
