"""Inference: `apply`, `evaluate`, `review` and snap; they import nothing from extraction or training."""
