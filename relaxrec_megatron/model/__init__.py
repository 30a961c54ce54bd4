"""megatron-core relaxed recursive model: layer specs with per-loop LoRA, recursive decoder, GPT model."""
