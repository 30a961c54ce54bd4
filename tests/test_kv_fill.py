"""The K/V an early exit skips: written when a later token reads them, equal to the skipped loops'
projections of the exit hidden state in the HF model."""

import pytest
import torch
from serving import NEW, requests

from relaxrec_megatron.inference.engine import Engine, ExitPolicy, mean_loops_per_token


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
