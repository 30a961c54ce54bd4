"""Uptraining: run configuration and preflight, data, the trainer (distillation, early exits, gradient
contracts of shared layers, precision), checkpoints and run folders, stops and stalled ranks, planning (memory, time and data-parallel traffic,
and the collectives counter that checks the traffic)."""
