"""Evaluation: few-shot accuracy through lm-evaluation-harness (its tasks, and the offline tasks shipped
in evaluation/tasks), perplexity, early-exit calibration and the plots of both, on HF or Megatron
checkpoints."""
