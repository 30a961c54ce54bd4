#!/usr/bin/env python
"""Benchmark: data-parallel gradient traffic of one training step under each DeepSpeed reduction
option, in the same run: bytes handed to collectives per rank, bytes on the wire per rank (ring
algorithms), time per step, and the losses against the exact reference (fp32 reduction).

Every collective DeepSpeed issues goes through its communication backend; each rank counts the
tensors it hands to it during the training steps (training.comms: the model broadcast at start-up,
the trainer's own agree all-reduce and DeepSpeed's scalar norms and flags are left out), and sets
them against what `relaxrec plan` counts (training.memory.dp_traffic).

    python tools/bench_dp.py [--hidden 512] [--layers 8] [--steps 6] [--micro 4] [--dtype bf16] [--options ...]

Gloo on one host moves bytes through memory: the times say what the reduction costs in CPU work, not
what an interconnect would take. `relaxrec plan` turns the bytes into time on a stated interconnect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_train import run_arguments, synthetic_run  # tools/, this script's folder

# each option: the run config's overrides, and DeepSpeed settings put over the trainer's own
OPTIONS = {
    "zero1 (default)": (["parallel.zero_stage=1"], {}),
    "zero1 fp32-reduce": (["parallel.zero_stage=1", "parallel.grad_reduce_dtype=fp32"], {}),
    "zero2 (overlap)": (["parallel.zero_stage=2"], {}),
    "zero2 no-overlap": (["parallel.zero_stage=2"], {"overlap_comm": False}),
    "zero2 small buckets": (["parallel.zero_stage=2"], {"reduce_bucket_size": 2_000_000}),
    "zero2 fp32-reduce": (["parallel.zero_stage=2", "parallel.grad_reduce_dtype=fp32"], {}),
}
REFERENCE = "zero1 fp32-reduce"


def counted_entry(config_path: str, overrides: list[str], out: str, zero: dict) -> None:
    """One rank: the trainer with `zero` put over its ZeRO settings, counting DeepSpeed's collectives
    in each training step (training.comms)."""
    import torch.distributed as dist

    from relaxrec_megatron.training import trainer as trainer_mod
    from relaxrec_megatron.training.comms import CollectiveCounter
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.run import train

    built = trainer_mod.deepspeed_config

    def config(cfg, micro_batches, dp):
        ds = built(cfg, micro_batches, dp)
        ds["zero_optimization"].update(zero)
        return ds

    trainer_mod.deepspeed_config = config
    per_step = []
    with CollectiveCounter() as counter:
        hooks = trainer_mod.Hooks(before_step=lambda t: counter.start(),
                                  after_step=lambda t, rec: per_step.append(counter.stop()))
        records = train(load_config(config_path, overrides), hooks)
    Path(f"{out}.rank{dist.get_rank()}.json").write_text(json.dumps({"records": records, "comms": per_step},
                                                                     default=str))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(p, steps=6)
    p.add_argument("--micro", type=int, default=4, help="micro-batches per rank and step")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated names from: " + ", ".join(OPTIONS))
    a = p.parse_args()

    from relaxrec_megatron.parallel.local_world import run_world
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.planning import plan

    root = Path(tempfile.mkdtemp(prefix="bench_dp_"))
    synthetic_run(root, a.hidden, a.layers, a.rank, a.seq, a.steps, global_batch=2 * 2 * a.micro, dtype=a.dtype)
    results = {}
    for i, name in enumerate(a.options.split(",")):
        overrides, zero = OPTIONS[name]
        out = root / f"opt{i}"
        run_world(counted_entry, 2, str(root / "c.yaml"), [f"run.output_dir={root}/run-{i}", *overrides], str(out),
                  zero, timeout=3600)
        results[name] = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    print(f"DP=2 (gloo, 2 processes of 1 thread), {a.dtype} weights, fp32 gradient accumulation, {a.micro} "
          f"micro-batches per rank and step, hidden {a.hidden}, {a.layers} layers (relaxed, 2 loops, LoRA rank {a.rank}); "
          "per rank and step, after the first")
    print(f"  {'option':<20} {'handed MB':>10} {'/ plan':>7} {'sent MB':>8} {'calls':>6} {'s/step':>7} "
          f"{'max |loss - ref| / ref':>23}")
    ref = [r["loss"] for r in results.get(REFERENCE, next(iter(results.values())))[0]["records"]]
    for name, ranks in results.items():
        steps = [{k: v for k, v in ops.items() if not k.endswith("(scalars)")}  # norms and flags: a few bytes
                 for ops in ranks[0]["comms"][1:]]
        handed = statistics.mean(sum(op["bytes"] for op in s.values()) for s in steps)
        wire = statistics.mean(sum(op["wire"] for op in s.values()) for s in steps)
        calls = statistics.mean(sum(op["calls"] for op in s.values()) for s in steps)
        planned = plan(load_config(root / "c.yaml", OPTIONS[name][0]), 2)["dp_traffic"]["bytes"]
        seconds = statistics.median(r["seconds"] for r in ranks[0]["records"][1:])
        loss = [r["loss"] for r in ranks[0]["records"]]
        rel = max(abs(x - y) / abs(y) for x, y in zip(loss, ref))
        print(f"  {name:<20} {handed / 1e6:10.1f} {handed / planned:7.3f} {wire / 1e6:8.1f} {calls:6.0f} "
              f"{seconds:7.2f} {rel:23.2e}")
        print(f"  {'':<20} " + ", ".join(f"{k} {v['calls']}x {v['bytes'] / 1e6:.1f} MB" for k, v in steps[-1].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
