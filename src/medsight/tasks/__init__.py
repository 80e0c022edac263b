"""Tasks: one module per method (its loss, training step and inference)."""
