"""Evaluation: perplexity and greedy generation."""
