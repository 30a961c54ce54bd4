#!/usr/bin/env python
"""GPU check of the Transformer Engine path (needs CUDA and transformer-engine; about a minute).

Builds a small relaxed recursive model twice from the same weights, with the local spec and the TE
spec, runs forward+backward in bf16 and in FP8 (current scaling: correct when one module runs
several times per step, unlike delayed scaling), compares logits and gradients against the local
bf16 model, and prints step times.

    python tools/gpu_check.py [--hidden 1024] [--layers 8] [--rank 64] [--seq 1024] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import settings_dict  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from relaxrec_megatron.parallel.distributed import build_model, free_port, init_distributed

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(1, 1)
    from relaxrec_megatron.model.settings import RelaxedSettings
    from relaxrec_megatron.model.state_adapter import local_shard, pieces, set_local_shard

    settings = RelaxedSettings(settings_dict(a))
    torch.manual_seed(0)
    local = build_model(settings, torch.bfloat16, use_te=False)
    with torch.no_grad():
        for name, prm in local.named_parameters():
            prm.normal_(0.0, 0.02) if "norm" not in name else prm.fill_(1.0)
    te_model = build_model(settings, torch.bfloat16, use_te=True)
    src = dict(local.named_parameters())
    canon = {pc.canon + pc.part: local_shard(pc, src[pc.param]) for pc in pieces(local, settings)}
    dst = dict(te_model.named_parameters())
    for pc in pieces(te_model, settings):
        set_local_shard(pc, dst[pc.param], canon[pc.canon + pc.part])

    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda")
    pos = torch.arange(a.seq, device="cuda")[None].expand(a.batch, -1)
    mask = torch.triu(torch.ones(a.seq, a.seq, dtype=torch.bool, device="cuda"), 1)[None, None]
    fp8 = recipe.Float8CurrentScaling() if hasattr(recipe, "Float8CurrentScaling") else None

    def step(model, use_fp8: bool):
        model.zero_grad(set_to_none=True)
        with te.fp8_autocast(enabled=use_fp8, fp8_recipe=fp8):
            logits = model(tokens, pos, mask, gather_logits=True)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        grads = {pc.canon + pc.part: local_shard(pc, dict(model.named_parameters())[pc.param].grad)
                 for pc in pieces(model, settings)}
        return logits.detach(), grads

    def timed(model, use_fp8: bool) -> float:
        times = []
        for i in range(a.iters + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, use_fp8)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    ok = True
    ref_logits, ref_grads = step(local, False)
    runs = [("TE bf16", te_model, False, 2e-2)]
    if fp8 is None:
        print("FP8: this Transformer Engine has no Float8CurrentScaling recipe; FP8 check skipped (needs TE >= 2.2)")
    else:
        runs.append(("TE fp8 (current scaling)", te_model, True, 1e-1))
    print(f"{torch.cuda.get_device_name()}: hidden {a.hidden}, {a.layers} unrolled = {a.layers // a.loops} x "
          f"{a.loops} loops, LoRA rank {a.rank}, batch {a.batch} x seq {a.seq}")
    print(f"  local bf16                 step {timed(local, False) * 1e3:8.2f} ms   (reference)")
    for label, model, use_fp8, tol in runs:
        try:
            logits, grads = step(model, use_fp8)
            logit_err = rel(logits, ref_logits)
            grad_err = max(rel(grads[k], ref_grads[k]) for k in ref_grads)
            good = logit_err <= tol and grad_err <= 5 * tol
            ok &= good
            print(f"  {label:<26} step {timed(model, use_fp8) * 1e3:8.2f} ms   logits rel err {logit_err:.2e}, "
                  f"worst grad rel err {grad_err:.2e} (tol {tol:g}/{5 * tol:g}) {'ok' if good else 'FAILED'}")
        except Exception as e:  # report and go on to the next variant
            ok = False
            print(f"  {label:<26} FAILED: {type(e).__name__}: {e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
