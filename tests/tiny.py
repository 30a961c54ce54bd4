"""Tiny random HF models (fp32) for parity tests. Norm weights and biases are randomised so that
a test which mixes up per-layer and shared vectors fails."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GPTNeoXConfig, LlamaConfig

ARCHS = ("llama", "gemma", "gpt_neox")


def tiny_config(arch: str, layers: int = 4):
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=128)
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "gemma":
        return GemmaConfig(**common, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common, use_parallel_residual=True, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    raise ValueError(arch)


def tiny_model(arch: str, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
            else:  # larger than the default init so that layers differ visibly
                p.normal_(0.0, 0.15)
    return model.eval()


def save_tiny(arch: str, folder: Path, layers: int = 4, seed: int = 0) -> Path:
    model = tiny_model(arch, layers, seed)
    model.save_pretrained(folder)
    return folder
