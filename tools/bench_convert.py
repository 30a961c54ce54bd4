#!/usr/bin/env python
"""Benchmark: convert a random-weight checkpoint with Gemma 2B's shapes (bf16, vocab 256000) at rank 512.

Builds the checkpoint (not timed), then times `relaxrec convert` in a child process and reports its
wall time and peak RSS against the targets (<= 5 min, <= 6 GB on a 2-core CPU machine).

    python tools/bench_convert.py [--rank 512] [--init average] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
GEMMA = json.loads((ROOT / "configs" / "models" / "gemma-2b.json").read_text())


def build_checkpoint(folder: Path, cfg: dict) -> None:
    from relaxrec_megatron.hf.arch import adapter_for

    adapter = adapter_for(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rand = lambda shape: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file({hf: rand(adapter.global_tensor_shapes()[c]) for c, hf in adapter.global_names().items()},
              str(folder / "model-globals.safetensors"))
    for i in tqdm(range(adapter.num_layers), desc="build random Gemma-2B", unit="layer"):
        names = adapter.layer_names(i)
        save_file({names[c]: rand(s) for c, s in adapter.layer_tensor_shapes().items()},
                  str(folder / f"model-{i:05d}.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", default="512")
    p.add_argument("--init", default="average")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the random source and the output")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    src, out = work / "gemma-2b-random", work / "relaxed"
    try:
        if not (src / "config.json").is_file():
            build_checkpoint(src, GEMMA)
        cmd = [sys.executable, "-m", "relaxrec_megatron.cli.main", "convert", str(src), str(out), "--rank", args.rank,
               "--init", args.init, "--lora-init", "svd", "--overwrite", "--quiet"]
        print("timing:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux
        size_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
        print(f"convert Gemma-2B shapes, rank {args.rank}, {args.init} init, SVD LoRA, bf16 -> bf16 "
              f"({torch.get_num_threads()} threads)")
        print(f"  wall time  {wall:7.1f} s   (target <= 300 s: {'ok' if wall <= 300 else 'MISSED'})")
        print(f"  peak RSS   {peak_gb:7.2f} GB  (target <= 6 GB: {'ok' if peak_gb <= 6 else 'MISSED'})")
        print(f"  output     {size_gb:7.2f} GB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
