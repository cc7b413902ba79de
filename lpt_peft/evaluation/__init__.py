"""Evaluation: shot-group accuracy (`metrics`), plots, run reports and the adapter's model card."""
