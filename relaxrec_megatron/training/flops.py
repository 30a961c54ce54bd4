"""Model FLOPs per token (for TFLOP/s per GPU and MFU) and peak dense bf16 FLOP/s by GPU."""

from __future__ import annotations

import torch

# dense bf16 tensor-core peak, FLOP/s (vendor data sheets; SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L4": 121e12, "A10": 125e12, "B200": 2250e12, "GB200": 2500e12}


def matmul_flops_per_token(hf: dict, seq_length: int) -> float:
    """Forward matmul FLOPs per token of the unrolled relaxed model: linears + LoRA + attention + head."""
    h, f, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "up": (f, h), "down": (h, f)}
    if hf["gated_mlp"]:
        shapes["gate"] = (f, h)
    linear = sum(2 * o * i for o, i in shapes.values())
    lora = sum(2 * r * (shapes[m][0] + shapes[m][1]) for m, r in (hf.get("lora_ranks") or {}).items() if m in shapes)
    attention = 2 * 2 * seq_length * q
    return L * (linear + lora + attention) + 2 * h * hf["vocab_size"]


def train_flops_per_token(student: dict, teacher: dict | None, seq_length: int) -> float:
    """Student forward + backward (3x forward), teacher forward."""
    flops = 3 * matmul_flops_per_token(student, seq_length)
    return flops + (matmul_flops_per_token(teacher, seq_length) if teacher else 0.0)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None
