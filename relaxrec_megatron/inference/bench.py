"""Serving benchmark: one request trace served by every mode, measured, plus the paper's simulation.

Measured: tokens/s, latency p50/p99 (from the trace's start: all requests are queued at t=0, a FIFO
like the paper's successor's setup), mean loops per token and agreement (the share of generated
tokens equal to the full-depth model's, seq-CB's, at the same position), per mode, in one run.
Simulated (--simulate), two cost models over the same replay of the scheduler with each CDB row's exit
trace (oracle, sampled, or the exits a confidence run took): the paper's, where a step costs the
layers it runs (a batch runs in parallel: sequence-wise CB pays B*K per step, depth-wise K per step;
KV fill and LM head free), and the memory-bound one, where a step costs the weight bytes it reads
(schedule.StepCost). Each replays the engine's schedule under its own costs (under the paper's, every
loop present runs). At batch 8 on a CPU the measured CDB speedups fall between the two.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch

from .engine import Engine, ExitPolicy, Request, mean_loops_per_token, oracle_exit_trace
from .schedule import StepCost, step_loops, weight_bytes
from .weights import EngineWeights, unrolled_weights


@dataclass
class TraceSpec:
    requests: int = 16
    prompt_mean: float = 32
    prompt_std: float = 8
    gen_mean: float = 32  # the paper's successor uses 256; scaled down for CPU
    gen_std: float = 8
    seed: int = 0


def make_trace(spec: TraceSpec, corpus: list[int]) -> list[Request]:
    """Prompts are windows of real text; generation lengths ~ Normal(gen_mean, gen_std), at least 1."""
    g = torch.Generator().manual_seed(spec.seed)
    reqs = []
    for i in range(spec.requests):
        n = max(1, int(round(spec.prompt_mean + spec.prompt_std * float(torch.randn(1, generator=g)))))
        m = max(1, int(round(spec.gen_mean + spec.gen_std * float(torch.randn(1, generator=g)))))
        start = int(torch.randint(0, max(1, len(corpus) - n), (1,), generator=g))
        reqs.append(Request(corpus[start:start + n], m, id=i))
    return reqs


def latency_percentiles(reqs: list[Request]) -> tuple[float, float]:
    lat = sorted(r.t_done - r.t_arrival for r in reqs)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return statistics.median(lat), p99


def serve(weights: EngineWeights, trace: list[Request], mode: str, max_batch: int, max_len: int,
          exit_policy: ExitPolicy | None = None, traces: list[list[int]] | None = None,
          schedule: str = "bytes") -> dict:
    reqs = copy.deepcopy(trace)
    if traces is not None:
        for r, t in zip(reqs, traces):
            r.exit_trace = t
    stats = Engine(weights, mode=mode, max_batch=max_batch, max_len=max_len, exit_policy=exit_policy,
                   schedule=schedule).run(reqs)
    p50, p99 = latency_percentiles(reqs)
    return {"tokens_per_s": stats.tokens_per_s, "p50": p50, "p99": p99, "mean_loops": mean_loops_per_token(reqs),
            "seconds": stats.seconds, "tokens": stats.tokens, "exits_per_loop": stats.exits_per_loop,
            "exit_trace": [[n - 1 for n in r.loops_used] for r in reqs],  # the exits taken, as an oracle trace
            "outputs": [list(r.output) for r in reqs]}


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Share of generated tokens equal to the reference's at the same position of the same request."""
    same = sum(a == b for out, ref in zip(outputs, reference) for a, b in zip(out, ref))
    return same / max(1, sum(len(ref) for ref in reference))


def oracle_traces(weights: EngineWeights, trace: list[Request], max_batch: int, max_len: int) -> list[list[int]]:
    reqs = copy.deepcopy(trace)
    Engine(weights, mode="seq", max_batch=max_batch, max_len=max_len, record_loop_predictions=True).run(reqs)
    return [oracle_exit_trace(r) for r in reqs]


def sampled_exit_traces(trace: list[Request], loops: int, exit_prob: float, seed: int = 0) -> list[list[int]]:
    """Exit traces with a chosen exit rate, for measuring the engine where exits are frequent (an
    uptrained model's) even when the served model rarely exits: each decoded token exits after each
    non-final loop with probability exit_prob. Mean loops per token: sum_b (1 - p)^b for b < loops."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in trace:
        draws = torch.rand(r.max_new_tokens, max(loops - 1, 1), generator=g) < exit_prob
        exits = [next((b for b in range(loops - 1) if row[b]), loops - 1) for row in draws.tolist()]
        out.append([loops - 1] + exits[1:])  # token 0 comes from the prefill, which runs every loop
    return out


def simulate(trace: list[Request], traces: list[list[int]], loops: int, max_batch: int, depthwise: bool,
             cost: StepCost, schedule: str = "bytes", decides: bool = False) -> dict:
    """Replays the scheduler with oracle exits (trace[i][t]: the loop at which request i's token t exits;
    token 0 comes from the prefill and runs every loop) and returns tokens per unit of cost. A depth-wise
    step runs the loops that schedule.choose_loops picks under `cost` (schedule "bytes") or every loop
    present ("all"), and pays for those loops alone: the K/V fills ride them. It pays the LM head when
    a row it runs calls it: to emit, or, with `decides` (the exits a confidence rule took), to decide
    whether to exit, which every decoded row at an earlier loop does, as in the engine."""
    waiting = [(r.max_new_tokens, t) for r, t in zip(trace, traces)]
    rows: list[list] = []  # [generated, loop, max_new, trace, steps waited]
    spent = tokens = steps = head_steps = 0
    emits = lambda row: row[1] == loops - 1 or (0 < row[0] < len(row[3]) and row[3][row[0]] <= row[1])
    calls_head = lambda row: emits(row) or (decides and row[0] > 0)
    while waiting or rows:
        while waiting and len(rows) < max_batch:
            m, t = waiting.pop(0)
            rows.append([0, 0, m, t, 0])
        steps += 1
        if not depthwise:
            spent += loops * (cost.shared + cost.lora) + cost.head
            tokens, head_steps = tokens + len(rows), head_steps + 1
            rows = [[g + 1, 0, m, t, 0] for g, _, m, t, _ in rows if g + 1 < m]
            continue
        run = step_loops([(row[1], calls_head(row), row[4]) for row in rows], loops, cost, schedule)
        keep, emitted = [], 0
        head = any(row[1] in run and calls_head(row) for row in rows)
        for row in rows:
            gen, loop, m, t, waited = row
            if loop not in run:
                keep.append([gen, loop, m, t, waited + 1])
            elif emits(row):
                emitted += 1
                if gen + 1 < m:
                    keep.append([gen + 1, 0, m, t, 0])
            else:
                keep.append([gen, loop + 1, m, t, 0])
        spent += cost.shared + cost.lora * len(run) + (cost.head if head else 0)
        tokens, head_steps = tokens + emitted, head_steps + head
        rows = keep
    return {"tokens_per_cost": tokens / spent, "steps": steps, "head_steps": head_steps}


def run_benchmark(weights: EngineWeights, trace: list[Request], max_batch: int, max_len: int,
                  confidence: float | None = None, simulate_too: bool = False,
                  exit_prob: float | None = None, repeats: int = 1, schedule: str = "bytes",
                  replay: dict[str, list[list[int]]] | None = None, keep_traces: bool = False) -> list[dict]:
    """Every mode serves the trace `repeats` times, the modes interleaved so that drift in the
    machine's speed hits them alike; each row is the run with the median tokens/s. replay: more CDB
    rows, each serving with given exit traces (those another model took, from `bench serve
    --save-traces`); keep_traces: each row keeps the exits it took (`exit_trace`)."""
    B = weights.num_loops
    traces = {"CDB + oracle exits": oracle_traces(weights, trace, max_batch, max_len), **(replay or {})}
    if exit_prob is not None:
        traces[f"CDB + sampled exits p={exit_prob:g}"] = sampled_exit_traces(trace, B, exit_prob)
    vanilla = unrolled_weights(weights)
    baseline = "seq-CB"  # the speedups are against the relaxed model served one request depth at a time
    runs = {
        "vanilla (unrolled) seq-CB": lambda: serve(vanilla, trace, "seq", max_batch, max_len),
        "static batching": lambda: serve(weights, trace, "static", max_batch, max_len),
        baseline: lambda: serve(weights, trace, "seq", max_batch, max_len),
        "CDB, no exits": lambda: serve(weights, trace, "cdb", max_batch, max_len, schedule=schedule),
    }
    for mode, t in traces.items():
        runs[mode] = lambda t=t: serve(weights, trace, "cdb", max_batch, max_len, ExitPolicy("oracle"), t, schedule)
    deciding = f"CDB + maxprob>={confidence:g}" if confidence is not None else None
    if deciding:
        runs[deciding] = lambda: serve(weights, trace, "cdb", max_batch, max_len,
                                                                ExitPolicy("maxprob", confidence), schedule=schedule)
    results: dict[str, list[dict]] = {mode: [] for mode in runs}
    for _ in range(repeats):
        for mode, run in runs.items():
            results[mode].append(run())
    rows = []
    for mode, rs in results.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        rows.append({"mode": mode, **rs[len(rs) // 2]})
    base_row = next(r for r in rows if r["mode"] == baseline)
    base, full_depth = base_row["tokens_per_s"], base_row["outputs"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        r["agreement"] = agreement(r.pop("outputs"), full_depth)  # greedy tokens of the full-depth model
        decoded = r["mean_loops"] > 0  # not when every request stops at the prefill's token
        r["ideal"] = B / r["mean_loops"] if r["mode"].startswith("CDB") and decoded else None
    if simulate_too:
        traces["CDB, no exits"] = [[B - 1] * r.max_new_tokens for r in trace]
        for r in rows:  # confidence exits: replay the exits the measured run took
            if r["mode"].startswith("CDB") and r["mode"] not in traces:
                traces[r["mode"]] = r["exit_trace"]
        models = {"simulated": StepCost(shared=weights.num_shared), "bytes sim": weight_bytes(weights)}
        for column, cost in models.items():
            seq = simulate(trace, traces["CDB, no exits"], B, max_batch, False, cost)["tokens_per_cost"]
            for r in rows:
                if r["mode"] in traces:
                    r[column] = simulate(trace, traces[r["mode"]], B, max_batch, True, cost, schedule,
                                         decides=r["mode"] == deciding)["tokens_per_cost"] / seq
    if not keep_traces:
        for r in rows:
            del r["exit_trace"]
    return rows


def saved_traces(trace: list[Request], rows: list[dict], loops: int) -> dict:
    """What `bench serve --save-traces` writes: the trace's lengths and the exits each CDB row took."""
    return {"loops": loops, "requests": [[len(r.prompt), r.max_new_tokens] for r in trace],
            "traces": {r["mode"]: r["exit_trace"] for r in rows if r["mode"].startswith("CDB") and "exit_trace" in r}}


def format_rows(rows: list[dict], title: str) -> str:
    lines = [title, f"{'mode':<31}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}{'loops/tok':>10}{'speedup':>9}"
             f"{'ideal':>7}{'of ideal':>9}{'simulated':>10}{'bytes sim':>10}{'agree':>8}"]
    for r in rows:
        ideal = f"{r['ideal']:.2f}" if r.get("ideal") else "-"
        frac = f"{r['speedup'] / r['ideal']:.0%}" if r.get("ideal") else "-"
        sim, mem = (f"{r[c]:.2f}" if r.get(c) else "-" for c in ("simulated", "bytes sim"))
        lines.append(f"{r['mode']:<31}{r['tokens_per_s']:>8.1f}{r['p50']:>8.2f}{r['p99']:>8.2f}"
                     f"{r['mean_loops']:>10.2f}{r['speedup']:>9.2f}{ideal:>7}{frac:>9}{sim:>10}{mem:>10}"
                     f"{r['agreement']:>8.1%}")
    return "\n".join(lines)
