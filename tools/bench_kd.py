#!/usr/bin/env python
"""Benchmark: peak memory and time of the trainer's losses (forward + backward) on one micro-batch of
bf16 logits, each path in a fresh process, in the same run:

  ce-megatron  megatron-core's vocab-parallel cross entropy on an fp32 copy (compute_language_model_loss)
  ce-chunked   training.kd without a teacher: what the trainer runs without KD (and for each exit)
  kd-plain     the plain composition: fp32 copies of both models' logits, log-softmaxes kept by autograd
  kd-chunked   training.kd with the teacher's logits

Peak memory is the process's peak resident set above what it held once the logits existed, shown
against one logits tensor and against what `relaxrec plan` counts for that path beyond the logits
it is given (training.memory.logits_bytes).

    python tools/bench_kd.py [--tokens 4096] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PATHS = ("ce-megatron", "ce-chunked", "kd-plain", "kd-chunked")


def measure(kind: str, tokens: int, vocab: int) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    # made in bf16 directly, (sequence, batch, vocabulary) as the LM head makes them: no fp32
    # temporary raises the peak before the measurement starts
    student = torch.randn(tokens, 1, vocab, generator=g, dtype=torch.bfloat16).mul_(3).requires_grad_(True)
    teacher = torch.randn(tokens, 1, vocab, generator=g, dtype=torch.bfloat16).mul_(3) if kind.startswith("kd") else None
    labels = torch.randint(0, vocab, (tokens, 1), generator=g)
    if kind == "ce-megatron":
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from relaxrec_megatron.parallel.distributed import single_process_group

        group = single_process_group()
        group.__enter__()
        ps.initialize_model_parallel(1, 1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "ce-megatron":
        loss = vocab_parallel_cross_entropy(student.float(), labels)
    elif kind == "kd-plain":
        s, t = student.float(), teacher.float()
        ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        loss = 0.5 * ce + 0.5 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:
        from relaxrec_megatron.training.kd import distillation_loss

        loss, _, _ = distillation_loss(student, teacher, labels, 0.5, 1.0)
    loss.mean().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (peak - base) / 1024, "seconds": seconds, "loss": float(loss.mean())}


def planned_mb(kind: str, tokens: int, vocab: int) -> float | None:
    """What `relaxrec plan` counts for the chunked paths, less the logits the measurement starts with."""
    if not kind.endswith("chunked"):
        return None
    from relaxrec_megatron.recursion.params import LayerShapes
    from relaxrec_megatron.training.memory import logits_bytes

    shapes = LayerShapes(linears={}, linear_bias={}, hidden=1, norm_has_bias=False, vocab=vocab, tied_embeddings=True)
    kd = kind.startswith("kd")
    given = (2 if kd else 1) * tokens * vocab * 2
    return (logits_bytes(shapes, 1, tokens, "bf16", 1, kd) - given) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.tokens, a.vocab)))
        return 0
    got = {}
    for kind in PATHS:
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--tokens", str(a.tokens), "--vocab",
                              str(a.vocab)], capture_output=True, text=True, check=True)
        got[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mb = a.tokens * a.vocab * 2 / 2**20
    print(f"training losses, {a.tokens} tokens x {a.vocab} vocabulary, bf16 logits ({logits_mb:.0f} MB each), "
          "forward + backward, one process each")
    for kind, r in got.items():
        plan = planned_mb(kind, a.tokens, a.vocab)
        planned = f"  plan +{plan:6.0f} MB" if plan is not None else ""
        print(f"  {kind:<12} peak +{r['peak_mb']:7.0f} MB  ({r['peak_mb'] / logits_mb:5.1f}x one logits tensor)"
              f"{planned}  {r['seconds']:6.2f} s  loss {r['loss']:.6f}")
    for chunked, plain in (("ce-chunked", "ce-megatron"), ("kd-chunked", "kd-plain")):
        print(f"  {chunked} / {plain}: memory {got[chunked]['peak_mb'] / got[plain]['peak_mb']:.3f}, "
              f"time {got[chunked]['seconds'] / got[plain]['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
