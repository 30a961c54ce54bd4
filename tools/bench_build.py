#!/usr/bin/env python
"""Benchmark: building the trainer's Megatron model of a run config (one rank, its whole stage, on the
CPU), with megatron's random initialisation and without it (the trainer's way: every weight is then
loaded from the checkpoint), each in a fresh process, in the same run.

    python tools/bench_build.py [--config gemma-2b-relaxed] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def build(config: str, dtype: str, init: bool) -> dict:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from relaxrec_megatron.model.build import build_model
    from relaxrec_megatron.model.settings import ParallelLayout, RelaxedSettings
    from relaxrec_megatron.parallel.distributed import free_port, init_distributed
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.planning import models

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(1, 1)
    _, _, student_hf, _ = models(load_config(config, []))
    settings = RelaxedSettings(student_hf, ParallelLayout())
    t0 = time.perf_counter()
    model = build_model(settings, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]), use_te=False,
                        init_weights=init)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "params": sum(p.numel() for p in model.parameters())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gemma-2b-relaxed")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--child", choices=["init", "no-init"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(build(a.config, a.dtype, a.child == "init")))
        return 0
    got = {}
    for kind in ("init", "no-init"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--config", a.config, "--dtype", a.dtype],
                             capture_output=True, text=True, check=True)
        got[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"build the Megatron model of {a.config} ({got['init']['params'] / 1e9:.2f}B parameters, {a.dtype}, "
          "one rank, CPU)")
    for kind, r in got.items():
        print(f"  {kind:<8} {r['seconds']:7.1f} s")
    print(f"  without initialisation / with: {got['no-init']['seconds'] / got['init']['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
