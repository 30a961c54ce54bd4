#!/usr/bin/env python
"""Benchmark: peak memory and time of the distillation loss (forward + backward) on one micro-batch of
bf16 logits, training.kd's chunked form against the plain composition (fp32 copies of both models'
logits, log-softmaxes, CE and KL kept by autograd), each in a fresh process, in the same run.

Peak memory is the process's peak resident set above what it held once the logits existed.

    python tools/bench_kd.py [--tokens 4096] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(kind: str, tokens: int, vocab: int) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    # made in bf16 directly: no fp32 temporary raises the peak before the measurement starts
    student = torch.randn(1, tokens, vocab, generator=g, dtype=torch.bfloat16).mul_(3).requires_grad_(True)
    teacher = torch.randn(1, tokens, vocab, generator=g, dtype=torch.bfloat16).mul_(3)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "chunked":
        from relaxrec_megatron.training.kd import distillation_loss

        loss, _, _ = distillation_loss(student, teacher, labels, 0.5, 1.0)
    else:
        s, t = student.float(), teacher.float()
        ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        loss = 0.5 * ce + 0.5 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    loss.mean().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (peak - base) / 1024, "seconds": seconds, "loss": float(loss.mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.tokens, a.vocab)))
        return 0
    got = {}
    for kind in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--tokens", str(a.tokens), "--vocab",
                              str(a.vocab)], capture_output=True, text=True, check=True)
        got[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mb = a.tokens * a.vocab * 2 / 2**20
    print(f"distillation loss, {a.tokens} tokens x {a.vocab} vocabulary, bf16 logits ({logits_mb:.0f} MB each), "
          "forward + backward, one process each")
    for kind, r in got.items():
        print(f"  {kind:<8} peak +{r['peak_mb']:8.0f} MB  ({r['peak_mb'] / logits_mb:5.1f}x one logits tensor)  "
              f"{r['seconds']:6.2f} s  loss {r['loss']:.6f}")
    print(f"  chunked / plain: memory {got['chunked']['peak_mb'] / got['plain']['peak_mb']:.3f}, "
          f"time {got['chunked']['seconds'] / got['plain']['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
