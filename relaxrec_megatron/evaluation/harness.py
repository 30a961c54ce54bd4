"""Few-shot accuracy with lm-evaluation-harness, through its Python API, on models loaded in process.

The paper's suite is seven tasks of the harness, averaged by accuracy (`PAPER_TASKS`; their data
come from the hub). `LOCAL_TASKS` are offline tasks of the same kinds that ship with this package.
A model is handed to the harness as an object, with its backend stated as causal: the harness
would otherwise guess the backend from the model type, which it does not know for the relaxed
recursive model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from pathlib import Path

from ..errors import UserError
from .local_tasks import LOCAL_TASKS, task_folder

# The RRT paper's few-shot suite; each task runs with its own default number of shots unless
# --num-fewshot says otherwise.
PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PAPER_METRIC = "acc"  # the paper averages accuracy


def quiet(verbose: bool = False) -> None:
    """The harness and datasets log every task they build; keep the progress of the requests only."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate", "absl", "huggingface_hub"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def task_manager(include_paths: list[str], tasks: list[str] = ()):
    """The harness's tasks, the shipped local ones and the user's folders, which take precedence. Where
    every task asked for is a task (not a group or tag) of the shipped ones or the user's folders, those
    alone are indexed: indexing the harness's thousands of task YAMLs takes about 20 s on a 2-core CPU.
    Each index is built once per process."""
    for p in include_paths:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p}: no such folder of task YAMLs")
    paths = tuple(str(Path(p).resolve()) for p in include_paths)
    if tasks:
        own = _indexed(paths, with_harness=False)
        if set(tasks) <= set(own.all_subtasks):
            return own
    return _indexed(paths, with_harness=True)


@functools.lru_cache(maxsize=4)
def _indexed(include_paths: tuple[str, ...], with_harness: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(task_folder()), *include_paths], include_defaults=with_harness)


def check_tasks(tasks: list[str], manager) -> None:
    """Every task known and built once, its data downloaded or found in the cache, before any model runs."""
    from lm_eval.tasks import get_task_dict

    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; see `lm-eval ls tasks`, or pass --include-path with its YAML "
                        f"(offline tasks that ship here: {', '.join(LOCAL_TASKS)})")
    try:
        get_task_dict(list(tasks), manager)
    except OSError as e:  # no network for hub data, a missing local data file
        raise UserError(f"cannot read the data of {', '.join(tasks)} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "without network use --tasks local, or --include-path with tasks on local files") from None


def evaluate(model, tokenizer, tasks: list[str], manager, num_fewshot: int | None = None, limit: int | None = None,
             batch_size: int = 8) -> dict:
    """{"results": {task: {metric: value}}, "n-shot": {task: k}, "samples": {task: [{doc_id, target,
    loglikelihoods, metrics}]}} for one model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from ..console import own_bars_hidden

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    # the bar of the requests (lm_eval.models.huggingface) stays: it is the evaluation's progress
    with _quiet_git_probe(), own_bars_hidden("lm_eval.api.task", "lm_eval.api.model"):
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                      limit=limit, log_samples=True, bootstrap_iters=0, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    results = {}
    for task, row in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in row.items()
                         if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    samples = {task: [{"doc_id": s["doc_id"], "target": s["target"],
                       "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
                       "metrics": {m: float(s[m]) for m in s["metrics"] if m in s}} for s in rows]
               for task, rows in out["samples"].items()}
    return {"results": results, "n-shot": out.get("n-shot", {}), "samples": samples}


@contextlib.contextmanager
def _quiet_git_probe():
    """The harness records the working folder's git commit with `git describe`, whose stderr ("fatal:
    not a git repository") reaches the console outside a repository: the same probe, its stderr kept."""
    import lm_eval.evaluator as evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def commit() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    original, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, commit
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def paper_average(results: dict) -> float | None:
    """Mean accuracy over the paper's tasks, when all of them were run."""
    if not all(t in results and PAPER_METRIC in results[t] for t in PAPER_TASKS):
        return None
    return sum(results[t][PAPER_METRIC] for t in PAPER_TASKS) / len(PAPER_TASKS)


def mean_accuracy(results: dict) -> float | None:
    accs = [r[PAPER_METRIC] for r in results.values() if PAPER_METRIC in r]
    return sum(accs) / len(accs) if accs else None


def column_label(name: str) -> str:
    """A model's name cut to a table column."""
    return name if len(name) <= 26 else "…" + name[-25:]


def format_table(report: dict) -> str:
    """Tasks down, models across; accuracies in %, perplexities as they are; the average last."""
    names = list(report["models"])
    results = {n: report["models"][n]["results"] for n in names}
    shots = next(iter(report["models"].values()))["n-shot"] if names else {}
    width = max([len(t) + 10 for t in report["tasks"]] + [28])
    lines = [f"{'task':<{width}}{'metric':<12}" + "".join(f"{column_label(n):>28}" for n in names)]
    for task in report["tasks"]:
        metrics = sorted({m for n in names for m in results[n].get(task, {})}, key=lambda m: (m != "acc", m))
        for i, metric in enumerate(metrics):
            head = f"{task} ({shots.get(task, '?')}-shot)" if i == 0 else ""
            cells = []
            for n in names:
                v = results[n].get(task, {}).get(metric)
                cells.append("-" if v is None else f"{100 * v:.1f}" if metric.startswith("acc") else f"{v:.3f}")
            lines.append(f"{head:<{width}}{metric:<12}" + "".join(f"{c:>28}" for c in cells))
    paper = [paper_average(results[n]) for n in names]
    if all(p is not None for p in paper):
        label, values = "average (paper's 7 tasks)", paper
    else:
        label, values = "mean accuracy", [mean_accuracy(results[n]) for n in names]
    lines.append(f"{label:<{width}}{'acc':<12}" + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>28}" for v in values))
    return "\n".join(lines)
