"""What the Megatron parity tests run: relaxed tiny models, layouts, tokens, and the early-exit
objectives; one spawned world per layout runs them all (conftest's parity_runs)."""

import glob
from pathlib import Path

import torch

from relaxrec_megatron.hf.convert import RecursionSpec

# (name, arch, spec): LoRA and pure recursive for every architecture; per-layer norms/biases and
# SEQUENCE order are covered on the way
CASES = [
    ("llama-lora", "llama", RecursionSpec(rank=3)),
    ("llama-pure", "llama", RecursionSpec(rank=0, strategy="sequence")),
    ("gemma-lora", "gemma", RecursionSpec(rank=4, strategy="sequence", share_norms=False)),
    ("gemma-pure", "gemma", RecursionSpec(rank=0, init="stepwise")),
    ("neox-lora", "gpt_neox", RecursionSpec(rank=-1, share_norms=False, share_biases=False)),
    ("neox-pure", "gpt_neox", RecursionSpec(rank=0, strategy="sequence")),
]
# the KD teacher of the exit cases: the llama source as a 1-loop model, as `relaxrec train` builds it
TEACHER = ("llama-teacher", "llama", RecursionSpec(loops=1, init="lower", rank=0))
LAYOUTS = {
    "tp1pp1": dict(tp=1, pp=1),
    "tp2pp1": dict(tp=2, pp=1),
    "tp1pp2": dict(tp=1, pp=2),
    "tp2pp1-sp": dict(tp=2, pp=1, sp=True),
    "tp1pp2-recompute": dict(tp=1, pp=2, recompute=True),
}
EXIT_LAYOUTS = ("tp1pp1", "tp2pp1-sp", "tp1pp2")  # PP=2 splits the llama's 2 loops one per stage
TOKENS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
# early-exit objectives on llama-lora (CYCLE, 2 loops): each way an earlier exit learns, with and without KD
EXIT_CASES = [
    dict(name="exit-final", teacher=False, kd=dict(enabled=False),
         exit=dict(weights=[0.3, 1.0], distill="final", alpha=0.4, temperature=2.0)),
    dict(name="exit-none", teacher=False, kd=dict(enabled=False),
         exit=dict(weights=[0.7, 0.9], distill="none")),
    dict(name="exit-teacher-kd", teacher=True, kd=dict(enabled=True, alpha=0.6, temperature=1.5),
         exit=dict(weights=[0.5, 1.0], distill="teacher", alpha=0.3, temperature=2.0)),
]


def exit_jobs(relaxed: Path) -> list[dict]:
    return [{**c, "student": str(relaxed / "llama-lora"), "teacher": str(relaxed / TEACHER[0]) if c["teacher"] else None}
            for c in EXIT_CASES]


def full_grads(folder: Path, name: str, kind: str = "grads") -> dict[str, torch.Tensor]:
    parts: dict[str, dict[int, tuple]] = {}
    for f in sorted(glob.glob(f"{folder}/{name}.{kind}.rank*.pt")):
        for canon, (axis, tp_rank, t) in torch.load(f).items():
            parts.setdefault(canon, {})[tp_rank] = (axis, t)
    return {c: d[0][1] if d[0][0] is None else torch.cat([d[r][1] for r in sorted(d)], d[0][0])
            for c, d in parts.items()}
