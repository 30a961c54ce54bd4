"""HF side: checkpoint reading, architecture adapters, the relaxed recursive HF model, conversion/export."""
