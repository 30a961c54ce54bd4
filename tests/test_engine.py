"""The serving engine against HF generate() (the independent reference), fp32, CPU: every mode,
batch size and exit policy."""

import pytest
from serving import NAMES, NEW, hf_greedy, requests
from transformers import AutoModelForCausalLM

from relaxrec_megatron.hf.convert import RecursionSpec, convert_to_relaxed
from relaxrec_megatron.hf.export import export_unrolled
from relaxrec_megatron.inference import block
from relaxrec_megatron.inference.engine import Engine, ExitPolicy, mean_loops_per_token, oracle_exit_trace
from relaxrec_megatron.inference.head import ScreenedHead
from relaxrec_megatron.inference.weights import engine_weights, unrolled_weights


@pytest.mark.parametrize("max_batch", [1, 3, 5])
@pytest.mark.parametrize("mode", ["cdb", "seq", "static"])
@pytest.mark.parametrize("name", NAMES)
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
