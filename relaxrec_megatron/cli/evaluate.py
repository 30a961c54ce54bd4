"""relaxrec eval: few-shot accuracy (lm-evaluation-harness) and corpus perplexity, models side by side.

MODEL is a relaxed recursive HF checkpoint, an unrolled export or any HF model (folder or hub id),
a Megatron dist checkpoint, a training checkpoint (runs/.../checkpoints/step_N) or a run's
checkpoints folder (its latest step); Megatron checkpoints are exported to HF on the fly.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..files import write_json
from .options import require_matplotlib, resolve_device


def _common(p) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoints to score, side by side")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the checkpoint's, "
                                                     "or for a Megatron checkpoint its run's or source's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: the checkpoint's")
    p.add_argument("--verbose", action="store_true", help="show the harness's and datasets' own logs and bars")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="few-shot accuracy and perplexity of checkpoints", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    t = targets.add_parser("tasks", help="lm-evaluation-harness tasks (default: the paper's seven)")
    _common(t)
    t.add_argument("--tasks", default="paper", help="comma list of harness task names, or 'paper' (lambada_openai, "
                   "hellaswag, piqa, winogrande, arc_easy, arc_challenge, openbookqa; hub data) or 'local' "
                   "(the offline relaxrec_pydoc_lastword, relaxrec_pydoc_continuation)")
    t.add_argument("--num-fewshot", type=int, default=None, help="shots for every task (default: each task's own)")
    t.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    t.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAMLs in the harness's format (repeatable)")
    t.add_argument("--output", default="outputs/eval/tasks.json", help="results and per-sample loglikelihoods")
    t.set_defaults(run=run_tasks)
    i = targets.add_parser("include-path", help="print the shipped tasks' folder, for lm_eval --include_path",
                           description="The folder of the offline tasks relaxrec ships (relaxrec_pydoc_lastword, "
                                       "relaxrec_pydoc_continuation): lm-evaluation-harness's own CLI runs them "
                                       "from any working directory with --include_path $(relaxrec eval include-path).")
    i.set_defaults(run=lambda args: print(_tasks_folder()) or 0)
    q = targets.add_parser("ppl", help="perplexity on a text corpus, sliding window")
    _common(q)
    _corpus_args(q)
    q.add_argument("--output", default=None, help="write the results as JSON")
    q.set_defaults(run=run_ppl)
    x = targets.add_parser("exits", help="early exits: each loop's perplexity, confidence thresholds, calibration",
                           description="Early exits of a relaxed recursive CYCLE checkpoint: each loop's perplexity "
                                       "on a corpus, the confidence thresholds that keep the full-depth greedy token "
                                       "at --agreement, stored with the checkpoint for serving (--no-store: not).")
    x.add_argument("model", metavar="MODEL", help="relaxed recursive CYCLE checkpoint (HF folder or Megatron)")
    _corpus_args(x, default_context=512)
    x.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the checkpoint's)")
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    x.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    x.add_argument("--agreement", type=float, default=0.99,
                   help="calibrate each criterion's threshold to this agreement with the full-depth greedy token")
    x.add_argument("--no-store", action="store_true",
                   help="do not write the calibrated thresholds into the checkpoint (exit_calibration.json)")
    x.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw agreement and perplexity against mean loops per token (needs matplotlib)")
    x.add_argument("--output", default=None, help="write every threshold's row as JSON")
    x.add_argument("--verbose", action="store_true", help="show third-party logs")
    x.set_defaults(run=run_exits)


def _corpus_args(q, default_context: int = 1024) -> None:
    q.add_argument("--data", nargs="+", required=True, metavar="FILES|DATASET",
                   help="jsonl/json/parquet/txt/arrow files or folders of them, or a hub dataset (as data prepare)")
    q.add_argument("--text-key", default="text")
    q.add_argument("--split", default="train", help="split of a hub dataset")
    q.add_argument("--context", type=int, default=default_context, help="tokens in a window (capped at the model's "
                                                                       "positions)")
    q.add_argument("--stride", type=int, default=None, help="tokens a window advances (<= context; default: half of it)")
    q.add_argument("--max-tokens", type=int, default=None, help="score the corpus's first N tokens only")


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _task_list(text: str) -> list[str]:
    from ..evaluation.harness import LOCAL_TASKS, PAPER_TASKS

    sets = {"paper": PAPER_TASKS, "local": LOCAL_TASKS}
    tasks = []
    for item in (t.strip() for t in text.split(",")):
        if item in sets:
            tasks += sets[item]
        elif item:
            tasks.append(item)
    if not tasks:
        raise UserError("--tasks is empty")
    return list(dict.fromkeys(tasks))


def _tasks_folder() -> Path:
    from ..evaluation.local_tasks import task_folder

    return task_folder()


def run_tasks(args) -> int:
    from ..evaluation import harness
    from ..evaluation.models import export_dir, load, resolve

    _positive(args, "limit", "batch_size")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    args.device = resolve_device(args.device)
    harness.quiet(args.verbose)
    tasks = _task_list(args.tasks)
    report = {"tasks": tasks, "num_fewshot": args.num_fewshot, "limit": args.limit, "models": {}}
    with export_dir() as tmp:
        models = [resolve(m, Path(tmp), args.tokenizer) for m in args.models]  # every reference checked first
        manager = harness.task_manager(args.include_path, tasks)
        harness.check_tasks(tasks, manager)
        for m in models:
            print(f"[eval] {m.name} ({m.kind}): {', '.join(tasks)}", flush=True)
            lm = load(m, args.device, args.dtype)
            report["models"][m.name] = {"kind": m.kind, **harness.evaluate(
                lm, m.tokenizer, tasks, manager, args.num_fewshot, args.limit, args.batch_size)}
            del lm
    print()
    print(harness.format_table(report))
    write_json(args.output, report)
    print(f"\n[eval] wrote {args.output}")
    return 0


def _check_corpus_args(args) -> None:
    if args.stride is None:
        args.stride = max(1, args.context // 2)
    _positive(args, "context", "stride", "max_tokens", "batch_size")
    if args.stride > args.context:
        raise UserError(f"--stride {args.stride} is larger than --context {args.context}")


def _texts(args) -> list[str]:
    from ..data.corpus import corpus_texts, open_corpus

    corpora = [open_corpus(src, args.split) for src in args.data]
    return [t for ds, src in zip(corpora, args.data) for t in corpus_texts(ds, args.text_key, src)]


def _documents(args, lm, tok, texts):
    """(context, stride, token tensors of the documents, their tokens) for this model."""
    import torch

    context = min(args.context, getattr(lm.config, "max_position_embeddings", args.context))
    stride = min(args.stride, context)
    docs, total = [], 0
    for text in texts:
        if args.max_tokens is not None and total >= args.max_tokens:
            break
        ids = tok(text).input_ids  # with the special tokens the tokenizer adds for this model
        ids = ids[: args.max_tokens - total] if args.max_tokens is not None else ids
        docs.append(torch.tensor(ids))
        total += len(ids)
    return context, stride, docs, total


def run_ppl(args) -> int:
    from ..evaluation import harness
    from ..evaluation.models import export_dir, load, resolve
    from ..evaluation.ppl import corpus_perplexity

    _check_corpus_args(args)
    args.device = resolve_device(args.device)
    harness.quiet(args.verbose)
    texts = _texts(args)
    rows = []
    with export_dir() as tmp:
        models = [resolve(m, Path(tmp), args.tokenizer) for m in args.models]
        for m in models:
            lm, tok = load(m, args.device, args.dtype), m.tokenizer
            context, stride, docs, total = _documents(args, lm, tok, texts)
            print(f"[eval] {m.name}: {len(docs)} documents, {total} tokens, context {context}, stride {stride}",
                  flush=True)
            stats = corpus_perplexity(lm, docs, context, stride, args.batch_size, total_tokens=total)
            rows.append({"model": m.name, "kind": m.kind, "context": context, "stride": stride, **stats})
            del lm
    print()
    print(f"{'model':<40}{'perplexity':>12}{'tokens':>10}{'context':>9}{'stride':>8}{'tok/s':>9}")
    for r in rows:
        print(f"{harness.column_label(r['model']):<40}{r['perplexity']:>12.3f}{r['tokens']:>10}{r['context']:>9}{r['stride']:>8}"
              f"{r['tokens_per_s']:>9.0f}")
    if args.output:
        write_json(args.output, {"data": args.data, "models": rows})
        print(f"\n[eval] wrote {args.output}")
    return 0


def run_exits(args) -> int:
    from tqdm.auto import tqdm

    from ..evaluation import exits, harness
    from ..evaluation.models import export_dir, load, resolve

    _check_corpus_args(args)
    if not 0.0 < args.agreement <= 1.0:
        raise UserError(f"--agreement {args.agreement}: a fraction of tokens in (0, 1]")
    if args.plot:
        require_matplotlib()
    args.device = resolve_device(args.device)
    harness.quiet(args.verbose)
    texts = _texts(args)
    with export_dir() as tmp:
        m = resolve(args.model, Path(tmp), args.tokenizer, use="eval exits")
        lm = load(m, args.device, args.dtype)
        exits.loop_end_indices(lm.config)
        context, stride, docs, total = _documents(args, lm, m.tokenizer, texts)
        print(f"[eval] {m.name}: {lm.config.num_loops} loops, {len(docs)} documents, {total} tokens, context "
              f"{context}, stride {stride}", flush=True)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="exits", dynamic_ncols=True)
        stats = exits.loop_stats(lm, docs, context, stride, args.batch_size, progress=bar.update)
        bar.close()
    report = {"model": args.model, "data": args.data, "tokens": stats.tokens, "context": context, "stride": stride,
              "agreement_target": args.agreement, "per_loop_perplexity": exits.per_loop_perplexity(stats),
              "rows": [r for c in exits.CRITERIA for r in exits.sweep(stats, c, exits.TABLE_THRESHOLDS[c])]}
    for c in exits.CRITERIA:
        report[c] = exits.calibrate(stats, c, args.agreement)
    print()
    print(exits.format_exits(report))
    if args.output:
        write_json(args.output, report)
        print(f"\n[eval] wrote {args.output}")
    if args.plot:
        from ..evaluation.plots import exit_tradeoff

        exit_tradeoff(report, args.plot)
        print(f"[eval] drew {args.plot}")
    if not args.no_store:
        exits.store_calibration(args.model, report)
    return 0
