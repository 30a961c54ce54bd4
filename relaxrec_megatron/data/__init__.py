"""Data: corpora from `datasets` (or the offline pydoc corpus), tokenized at tokenizer speed into megatron
indexed datasets (.bin/.idx)."""
