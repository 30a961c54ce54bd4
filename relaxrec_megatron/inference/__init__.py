"""Serving: continuous depth-wise batching with early exit over the relaxed recursive HF model."""
