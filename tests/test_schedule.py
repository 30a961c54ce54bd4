"""The depth-wise schedule (which loops a step runs) and the two cost models the benchmark simulates."""

import pytest
import torch
from serving import NEW, requests

from relaxrec_megatron.inference.bench import sampled_exit_traces, simulate
from relaxrec_megatron.inference.engine import Engine, ExitPolicy, Request
from relaxrec_megatron.inference.schedule import StepCost, choose_loops, max_wait, weight_bytes


def test_simulation_cost_models():
    trace = [Request([1] * 4, 50, id=i) for i in range(6)]
    no_exit, at_zero = [[1] * 50 for _ in trace], [[0] * 50 for _ in trace]

    def speedup(traces, cost, schedule="bytes", decides=False):
        seq = simulate(trace, no_exit, 2, 4, False, cost)["tokens_per_cost"]
        return simulate(trace, traces, 2, 4, True, cost, schedule, decides)["tokens_per_cost"] / seq

    layers = StepCost(shared=3)  # the paper's: a step costs the layers it runs
    assert speedup(no_exit, layers) == pytest.approx(1.0, rel=0.05)
    assert speedup(at_zero, layers) == pytest.approx(2.0, rel=0.05)
    # memory-bound: seq reads 2 x block + head per token step; a depth-wise step reads the block and the
    # head (a row emits every step); the K/V fills of loop 1 ride no step, as no later token reads them
    assert speedup(at_zero, StepCost(shared=1, head=1)) == pytest.approx(3 / 2, rel=0.05)
    assert speedup(at_zero, StepCost(shared=1, lora=1)) == pytest.approx(2.0, rel=0.05)
    assert speedup(no_exit, StepCost(shared=1, lora=1, head=1)) == pytest.approx(1.0, rel=0.05)
    # a confidence rule calls the head at loop 0 too, to decide: 2 x (block + head) per token step
    assert speedup(no_exit, StepCost(shared=1, head=1), decides=True) == pytest.approx(3 / 4, rel=0.05)
    assert speedup(at_zero, StepCost(shared=1, head=1), decides=True) == pytest.approx(3 / 2, rel=0.05)
    # one early exit puts a row out of step: every later step reads both loops' LoRA, unless the
    # schedule lets that row wait one step for the others
    one_exit = [[1, 0] + [1] * 48] + no_exit[1:]
    lora = StepCost(shared=1, lora=1)
    assert speedup(one_exit, lora, "all") < 0.8 < speedup(one_exit, lora, "bytes") <= 1.0
    assert speedup(one_exit, layers, "all") == speedup(one_exit, layers, "bytes")


@pytest.mark.parametrize("policy", [ExitPolicy("maxprob", 0.05), ExitPolicy("oracle")])
def test_the_bytes_simulation_replays_the_engines_steps_and_head_calls(served, policy):
    """The simulation on the exits a run took takes the engine's steps and pays the LM head where the
    engine calls it: for a confidence rule, on every step with a decoded row at an earlier loop."""
    _, w, prompts, _, _ = served["gpt_neox-recursive-4"]
    prompts = prompts + prompts[:3]
    traces = sampled_exit_traces(requests(prompts, None), w.num_loops, 0.4) if policy.kind == "oracle" else None
    reqs = requests(prompts, None, traces=traces)
    stats = Engine(w, mode="cdb", max_batch=4, max_len=64, exit_policy=policy).run(reqs)
    took = [[n - 1 for n in r.loops_used] for r in reqs]
    assert any(n < w.num_loops for r in reqs for n in r.loops_used[1:])
    confident = policy.kind == "maxprob"
    sim = simulate(reqs, took, w.num_loops, 4, True, weight_bytes(w), decides=confident)
    assert (sim["steps"], sim["head_steps"]) == (stats.steps, stats.head_calls)
    if confident:  # rows that decide and never exit: charged as oracle exits, the decisions' head calls go missing
        stay = [[w.num_loops - 1] * len(t) for t in took]
        charged = {d: simulate(reqs, stay, w.num_loops, 4, True, weight_bytes(w), decides=d) for d in (False, True)}
        assert charged[False]["steps"] == charged[True]["steps"]
        assert charged[False]["head_steps"] < charged[True]["head_steps"]
    seq = Engine(w, mode="seq", max_batch=4, max_len=64).run(requests(prompts, None))
    assert simulate(reqs, took, w.num_loops, 4, False, weight_bytes(w))["steps"] == seq.steps == seq.head_calls


def test_choose_loops_serves_the_most_rows_per_byte():
    free_lora, lora = StepCost(shared=1.0), StepCost(shared=1.0, lora=0.2)
    assert choose_loops({0: 1, 1: 7}, set(), set(), free_lora) == {0, 1}
    assert choose_loops({0: 1, 1: 7}, set(), set(), lora) == {1}  # 7 / 1.2 > 8 / 1.4
    assert choose_loops({0: 1, 1: 7}, set(), {0}, lora) == {0, 1}  # a row that waited long enough runs
    assert choose_loops({0: 4, 1: 4}, set(), set(), lora) == {0, 1}
    # the head is paid once per step: 3 / 1.1 for loop 0 alone ties 6 / 2.2 for both, and ties run more
    assert choose_loops({0: 3, 1: 3}, {1}, set(), StepCost(shared=1.0, lora=0.1, head=1.0)) == {0, 1}
    assert choose_loops({0: 3, 1: 3}, {1}, set(), StepCost(shared=1.0, lora=0.1, head=2.0)) == {0}


def test_choose_loops_equals_trying_every_set():
    from itertools import combinations

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 7, (1,), generator=g))
        rows_at = {b: int(torch.randint(1, 9, (1,), generator=g)) for b in range(n)}
        draw = lambda p: {b for b in rows_at if float(torch.rand(1, generator=g)) < p}
        head_at, must = draw(0.4), draw(0.2)
        cost = StepCost(1.0, float(torch.rand(1, generator=g)) * 0.5, float(torch.rand(1, generator=g)))
        value = lambda q: sum(rows_at[b] for b in q) / (cost.shared + cost.lora * len(q) + cost.head * bool(q & head_at))
        sets = [set(q) for k in range(1, n + 1) for q in combinations(rows_at, k) if must <= set(q)]
        top = max(value(q) for q in sets)
        chosen = choose_loops(rows_at, head_at, must, cost)
        assert must <= chosen and value(chosen) == pytest.approx(top, rel=1e-9)
        assert len(chosen) == max(len(q) for q in sets if value(q) >= top * (1 - 1e-9))
    many = {b: 1 + b % 3 for b in range(30)}  # 30 loops present: no 2^30 sets tried
    chosen = choose_loops(many, {29}, set(), StepCost(1.0, 0.05, 0.5))
    assert chosen and min(many[b] for b in chosen) >= max(many[b] for b in set(many) - chosen - {29})


@pytest.mark.parametrize("policy", [ExitPolicy("maxprob", 0.05), ExitPolicy("oracle")])
def test_bytes_schedule_keeps_rows_in_step_and_bounds_their_wait(served, policy, monkeypatch):
    """Oracle: one token of eight requests exits early. Run every loop present and that request stays out
    of step with the other seven to its end (every step reads both loops' LoRA); the bytes schedule has
    it wait one step (7 rows / (S + L + H) beats 8 / (S + 2L + H) on this model)."""
    model, w, prompts, _, _ = served["llama-relaxed-2"]
    eos = model.generation_config.eos_token_id
    prompts = prompts + prompts[:3]
    traces = [[1, 1, 0] + [1] * (NEW - 3)] + [[1] * NEW] * 7
    choose = Engine._loops_to_run
    seen = []

    def spy(self, rows):
        seen.append((max(r.waited for r in rows), len({r.loop for r in rows})))
        run = choose(self, rows)
        seen[-1] += (len(run),)
        return run

    monkeypatch.setattr(Engine, "_loops_to_run", spy)
    runs = {}
    for schedule in ("all", "bytes"):
        seen.clear()
        reqs = requests(prompts, eos, traces=traces)
        engine = Engine(w, mode="cdb", max_batch=8, max_len=64, exit_policy=policy, schedule=schedule)
        engine.run(reqs)
        runs[schedule] = ([r.output for r in reqs], [r.loops_used for r in reqs], list(seen))
    assert runs["all"][:2] == runs["bytes"][:2]  # the same tokens, exits and loops
    assert all(waited == 0 and ran == present for waited, present, ran in runs["all"][2])
    assert max(waited for waited, _, _ in runs["bytes"][2]) <= max_wait(w.num_loops)
    if policy.kind == "oracle":  # (a confidence exit calls the head at every loop: fewer rows wait)
        mixed = {s: sum(ran > 1 for _, _, ran in runs[s][2]) for s in runs}
        assert mixed["bytes"] < mixed["all"] - 3 and any(ran < present for _, present, ran in runs["bytes"][2])


def test_a_row_left_out_max_wait_steps_runs_next(served):
    from relaxrec_megatron.inference.engine import Row

    _, w, _, _, _ = served["llama-relaxed-2"]
    engine = Engine(w, mode="cdb", max_batch=8, max_len=64)
    ids = torch.tensor([1])
    rows = [Row(Request([1], 4, id=i), i, ids, [1], loop=1) for i in range(7)] + [Row(Request([1], 4), 7, ids, [1])]
    assert engine._loops_to_run(rows) == {1}
    rows[-1].waited = max_wait(w.num_loops)
    assert engine._loops_to_run(rows) == {0, 1}


def test_sampled_exit_traces_have_the_requested_rate():
    trace = [Request([1], 400, id=i) for i in range(10)]
    traces = sampled_exit_traces(trace, loops=3, exit_prob=0.5)
    decoded = [b + 1 for t in traces for b in t[1:]]
    assert all(t[0] == 2 and len(t) == 400 for t in traces)
    assert sum(decoded) / len(decoded) == pytest.approx(1 + 0.5 + 0.25, abs=0.05)
