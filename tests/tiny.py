"""Tiny random HF models (fp32) for parity tests. Norm weights and biases are randomised so that
a test which mixes up per-layer and shared vectors fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GPTNeoXConfig, LlamaConfig

ARCHS = ("llama", "gemma", "gpt_neox")
# the head of a script run by plain transformers, as a user without this package has it
WITHOUT_PACKAGE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'relaxrec_megatron':
            raise ImportError('relaxrec_megatron is blocked in this test')
sys.meta_path.insert(0, Block())
"""


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


def save_token_corpus(prefix: Path, documents: int = 200, vocab: int = 96, eod: int = 2, seed: int = 0) -> Path:
    """A megatron indexed dataset (prefix.bin/.idx) of random documents of 20-59 tokens, each ending in eod."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    g = torch.Generator().manual_seed(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(documents):
        doc = torch.randint(3, vocab, (int(torch.randint(20, 60, (1,), generator=g)),), generator=g).tolist() + [eod]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def save_run_config(root: Path, source: Path, seq_length: int = 16, train_steps: int = 10,
                    save_every: int = 100) -> Path:
    """root/c.yaml: a tiny uptraining run (2 loops, LoRA rank 4, KD, ZeRO-1, fp32) over root/data."""
    path = root / "c.yaml"
    path.write_text(f"""
run: {{name: tiny, output_dir: {root}/run, seed: 1}}
model: {{source: {source}, recursion: {{loops: 2, rank: 4}}, dtype: fp32}}
parallel: {{tp: 1, pp: 1, zero_stage: 1}}
data: {{blend: [1.0, {root}/data], split: "90,10,0", seq_length: {seq_length}}}
optim: {{global_batch_size: 8, micro_batch_size: 2, train_steps: {train_steps}, lr: 1.0e-3, min_lr: 1.0e-4,
        warmup_steps: 2}}
kd: {{enabled: true, alpha: 0.5, temperature: 1.0}}
checkpoint: {{save_every: {save_every}, keep_last: 2, resume: auto}}
eval: {{every: 0, batches: 2}}
logging: {{every: 1, wandb_mode: disabled}}
""")
    return path


def cache_repo(cache: Path, repo: str, folder: Path) -> None:
    """`repo` as huggingface_hub keeps it in its cache: refs/main -> snapshots/<commit>/."""
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
