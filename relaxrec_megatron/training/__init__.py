"""Uptraining: run configuration, distillation loss, (trainer: in progress)."""
