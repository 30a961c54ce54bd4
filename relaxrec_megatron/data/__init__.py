"""Data: corpora and tokenization."""
