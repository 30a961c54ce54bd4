#!/usr/bin/env python
"""One GPU check of the training path (one GPU, about 5 minutes): one line per check.

  train bf16     the real trainer (`relaxrec train`'s loop: DeepSpeed BF16_Optimizer, KD from the
                 full model) on a Gemma-2B-shaped model with fewer layers and random weights:
                 tokens/s, TFLOP/s per GPU, MFU, peak memory
  train vanilla  the same trainer on the source itself (1 loop, no LoRA): relaxed/vanilla step time
  plan           `relaxrec plan`'s per-GPU total for that run against its measured peak (target: within 15%)
  train fp8      model.fp8 (tensorwise current scaling) against the bf16 run: loss agreement, speed
  te layers      the TE layer spec against the local spec on the same weights (bf16, FP8)
  svd            `relaxrec convert`'s LoRA factors on the GPU against the CPU's (TinyLlama's 5632 x 2048
                 MLP shape, rank 64, both methods): B A within 1e-5 relative, and the time of each

FP8 lines say `skip` without Transformer Engine. Runs from the checkout: with the package installed, or
with the wheels of tools/gpu_wheels.sh on PYTHONPATH on a machine that has only torch and transformers
(docs/gpu.md). Everything it writes lives in one temporary folder, deleted at the end (an estimated
10 GB at the default sizes: no run keeps a checkpoint).

    python tools/gpu_check.py [--layers 4] [--seq 2048] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.append(str(TOOLS.parent))  # the checkout's package, where none is installed
from bench_model import settings_dict  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def line(check: str, status: str, details: str) -> None:
    print(f"{check:<14} {status:<6} {details}", flush=True)


def init_world() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from relaxrec_megatron.parallel.distributed import free_port, init_distributed

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(1, 1)


def te_installed() -> bool:
    from relaxrec_megatron.model.layer import te_available

    return te_available()


GEMMA_2B = dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256)
TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1,
            head_dim=64)  # --tiny: the same checks' code paths in a minute, on any machine


def gemma_shaped_source(folder: Path, layers: int, widths: dict) -> Path:
    """Gemma's architecture at `widths` (default Gemma 2B's: hidden 2048, MQA with 8 heads of 256,
    GeGLU 16384, 256K vocabulary) and `layers` layers, random weights, in bf16."""
    from transformers import AutoModelForCausalLM, GemmaConfig

    cfg = GemmaConfig(**widths, num_hidden_layers=layers, max_position_embeddings=8192,
                      hidden_activation="gelu_pytorch_tanh", eos_token_id=1, bos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


def random_tokens(prefix: Path, vocab: int, docs: int, length: int) -> Path:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    g = torch.Generator().manual_seed(0)
    for _ in range(docs):
        doc = torch.randint(3, vocab, (length,), generator=g).tolist() + [1]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def check_training(a) -> bool:
    """bf16 relaxed (KD), vanilla, and FP8 runs of the real trainer, one spawned process each."""
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        return train_and_compare(a, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def train_and_compare(a, root: Path) -> bool:
    from relaxrec_megatron.parallel.local_world import run_world
    from relaxrec_megatron.training.run import train_entry

    widths = TINY if a.tiny else GEMMA_2B
    source = gemma_shaped_source(root / "src", a.layers, widths)
    data = random_tokens(root / "data", widths["vocab_size"], docs=400, length=a.seq * 2)
    (root / "c.yaml").write_text(f"""
run: {{name: gpu-check, output_dir: {root}/run, seed: 1}}
model: {{source: {source}, recursion: {{loops: 2, init: average, rank: {a.rank}}}, dtype: bf16}}
parallel: {{tp: 1, pp: 1, recompute: true, zero_stage: 1}}
data: {{blend: [1.0, {data}], split: "99,1,0", seq_length: {a.seq}}}
optim: {{global_batch_size: {2 * a.micro}, micro_batch_size: {a.micro}, train_steps: {a.steps}, lr: 1.0e-5,
        warmup_steps: 1}}
kd: {{enabled: true}}
checkpoint: {{save_every: 100000, save_final: false, resume: none}}
eval: {{every: 0}}
logging: {{every: 1000, wandb_mode: disabled}}
""")

    def train(name: str, overrides: list[str]) -> list[dict]:
        out = root / name
        run_world(train_entry, 1, str(root / "c.yaml"), [f"run.output_dir={root}/run-{name}", *overrides], str(out),
                  timeout=900)
        return torch.load(f"{out}.rank0.pt", weights_only=False)

    def summary(recs: list[dict]) -> dict:  # TFLOP/s, MFU and memory are recorded on CUDA only
        warm = recs[2:] or recs
        nan = float("nan")
        return {k: statistics.median(r.get(k, nan) for r in warm) for k in ("tokens_per_s", "tflops_per_gpu",
                                                                            "seconds", "mfu")} | \
            {"memory_gb": max(r.get("memory_gb", nan) for r in recs)}

    ok = True
    shape = (f"{'tiny' if a.tiny else 'Gemma-2B'} widths, {a.layers} layers -> {a.layers // 2} x 2 loops, "
             f"rank {a.rank}, seq {a.seq}")
    try:
        relaxed = train("bf16", [])
        s = summary(relaxed)
        good = all(r["finite"] for r in relaxed)
        ok &= good
        line("train bf16", "ok" if good else "FAILED",
             f"{s['tokens_per_s']:.0f} tok/s, {s['tflops_per_gpu']:.1f} TFLOP/s, MFU {s['mfu']:.1%}, "
             f"peak {s['memory_gb']:.1f} GB, loss {relaxed[0]['loss']:.3f} -> {relaxed[-1]['loss']:.3f} ({shape}, KD)")
    except Exception as e:
        line("train bf16", "FAILED", f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}")
        return False
    check_plan(root / "c.yaml", [f"run.output_dir={root}/run-bf16"], s["memory_gb"])
    try:
        vanilla = summary(train("vanilla", ["model.recursion.loops=1", "model.recursion.rank=0", "kd.enabled=false"]))
        no_kd = summary(train("bf16-nokd", ["kd.enabled=false"]))
        line("train vanilla", "ok", f"{vanilla['tokens_per_s']:.0f} tok/s; relaxed/vanilla step time "
             f"{no_kd['seconds'] / vanilla['seconds']:.3f} (both without KD), KD costs "
             f"{s['seconds'] / no_kd['seconds'] - 1:+.0%}")
    except Exception as e:
        ok = False
        line("train vanilla", "FAILED", f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}")
    if not te_installed():
        line("train fp8", "skip", "Transformer Engine is not installed (pip install 'relaxrec-megatron[te]')")
        return ok
    try:
        fp8 = train("fp8", ["model.fp8=true", "model.fp8_first_last_bf16=true"])
        f = summary(fp8)
        drift = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(fp8, relaxed))
        good = drift <= 2e-2 and all(r["finite"] for r in fp8)
        ok &= good
        line("train fp8", "ok" if good else "FAILED",
             f"{f['tokens_per_s']:.0f} tok/s ({f['tokens_per_s'] / s['tokens_per_s']:.2f}x bf16), "
             f"peak {f['memory_gb']:.1f} GB, loss within {drift:.1e} of bf16 over {len(fp8)} steps (tol 2e-2)")
    except Exception as e:
        ok = False
        line("train fp8", "FAILED", f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}")
    return ok


def check_plan(config: Path, overrides: list[str], measured_gb: float) -> None:
    """The planner's estimate for the run just measured (peak of torch.cuda.max_memory_allocated)."""
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.planning import plan

    got = plan(load_config(config, overrides), gpus=1)
    terms = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in got["stages"][0].items() if v)
    if measured_gb != measured_gb:  # nan: no CUDA
        line("plan", "skip", f"no CUDA peak to compare; planned {got['total'] / 1e9:.2f} GB ({terms})")
        return
    ratio = got["total"] / 1e9 / measured_gb
    line("plan", "ok" if abs(ratio - 1) <= 0.15 else "off", f"planned {got['total'] / 1e9:.2f} GB vs measured peak "
         f"{measured_gb:.2f} GB: {ratio:.2f}x (target 0.85-1.15; {terms})")


def check_te_layers(a) -> bool:
    """The TE spec against the local spec on the same weights: bf16, and FP8 with current scaling."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    init_world()
    from relaxrec_megatron.model.build import build_model
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
    shape = (f"hidden {a.hidden}, {a.layers} unrolled = {a.layers // a.loops} x {a.loops} loops, LoRA rank "
             f"{a.rank}, batch {a.batch} x seq {a.seq}")
    reference = timed(local, False)
    runs = [("te bf16", te_model, False, 2e-2)]
    if fp8 is None:
        line("te fp8", "skip", "this Transformer Engine has no Float8CurrentScaling recipe (needs TE >= 2.2)")
    else:
        runs.append(("te fp8", te_model, True, 1e-1))
    for label, model, use_fp8, tol in runs:
        try:
            logits, grads = step(model, use_fp8)
            logit_err = rel(logits, ref_logits)
            grad_err = max(rel(grads[k], ref_grads[k]) for k in ref_grads)
            good = logit_err <= tol and grad_err <= 5 * tol
            ok &= good
            line(label, "ok" if good else "FAILED",
                 f"step {timed(model, use_fp8) * 1e3:.2f} ms vs local bf16 {reference * 1e3:.2f} ms; logits rel err "
                 f"{logit_err:.2e}, worst grad rel err {grad_err:.2e} (tol {tol:g}/{5 * tol:g}); {shape}")
        except Exception as e:  # report and go on to the next variant
            ok = False
            line(label, "FAILED", f"{type(e).__name__}: {e}")
    return ok


def check_svd(a) -> bool:
    from relaxrec_megatron.recursion.lora import lora_factors

    shape = (256, 128) if a.tiny else (5632, 2048)
    g = torch.Generator().manual_seed(0)
    W, S = torch.randn(*shape, generator=g) * 0.02, torch.randn(*shape, generator=g) * 0.02
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok, parts = True, []
    for svd in ("exact", "randomized"):
        times = {}
        for where in ("cpu", device):
            t = time.perf_counter()
            f = lora_factors(W, S, 16 if a.tiny else 64, generator=torch.Generator().manual_seed(1), svd=svd,
                             device=where)
            times[where] = (time.perf_counter() - t, f.B @ f.A)
        err = rel(times[device][1], times["cpu"][1])
        limit = 1e-5 if svd == "exact" else 1e-3  # randomized: the same iteration, other kernels' rounding
        ok &= err <= limit
        parts.append(f"{svd}: B A {err:.1e} from the CPU's (<= {limit:g}), {times['cpu'][0]:.2f} s CPU, "
                     f"{times[device][0]:.2f} s {device}")
    line("svd", "ok" if ok else "FAILED", "; ".join(parts))
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="layers of the Gemma-shaped training model")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank of the training model")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", type=int, default=2, help="micro-batch size (2 micro-batches per step)")
    p.add_argument("--steps", type=int, default=10)
    # the TE layer check's model
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--te-layers", dest="te_layers", type=int, default=8)
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="small widths and sequence: a smoke run, also on a CPU")
    a = p.parse_args()
    if a.tiny:
        a.seq, a.rank = min(a.seq, 128), min(a.rank, 16)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run this on a GPU machine (or --tiny for a smoke run)", file=sys.stderr)
        return 2
    from relaxrec_megatron.console import quiet_third_party

    quiet_third_party()  # the libraries' import-time notices; --verbose-style output with RELAXREC_VERBOSE=1
    t0 = time.time()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    import relaxrec_megatron

    print(f"{device}, torch {torch.__version__}, Transformer Engine {'installed' if te_installed() else 'not installed'}"
          f", relaxrec_megatron from {Path(relaxrec_megatron.__file__).parent}", flush=True)
    ok = check_svd(a)  # first: as `relaxrec convert` runs, with torch's default fp32 matmuls (no TF32)
    ok &= check_training(a)
    if te_installed():
        ok &= check_te_layers(argparse.Namespace(**{**vars(a), "layers": a.te_layers, "rank": 64}))
    else:
        line("te layers", "skip", "Transformer Engine is not installed")
    print(f"gpu_check: {'all ok' if ok else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
