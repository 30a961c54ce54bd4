"""The megatron-core relaxed recursive model on CPU (gloo, fp32): parity with the HF reference model
under TP/PP, the tied-gradient contract across pipeline stages, and resharding dist checkpoints."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron_jobs import fp8_context_job, load_job, save_job, te_fp8_job, te_parity_job, te_row_lora_job
from parity import CASES, LAYOUTS, TOKENS, full_grads
from transformers import AutoModelForCausalLM

from relaxrec_megatron.errors import UserError
from relaxrec_megatron.hf.checkpoint import CheckpointReader
from relaxrec_megatron.model.checkpoint import check_compatible, read_config
from relaxrec_megatron.model.settings import ParallelLayout, RelaxedSettings
from relaxrec_megatron.parallel.local_world import run_world


def hf_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS, use_cache=False).logits


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_logits_equal_the_hf_reference(parity_runs, relaxed, layout, name):
    got = torch.load(parity_runs / layout / f"{name}.logits.pt")
    diff = (got - hf_logits(relaxed / name)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_gradients_equal_the_hf_reference(parity_runs, relaxed, name):
    """Single-process Megatron gradients (after finalize_grads) vs autograd through the HF reference
    model on the same loss: the summed next-token cross entropy."""
    from relaxrec_megatron.model.state_adapter import canonical_getter

    model = AutoModelForCausalLM.from_pretrained(relaxed / name, dtype=torch.float32).train()
    logits = model(TOKENS, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1), reduction="sum").backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    reference = canonical_getter(grads.__getitem__, model.config.num_key_value_heads)
    got = full_grads(parity_runs / "tp1pp1", name)
    assert got and any(".lora." in k for k in got) == ("pure" not in name)
    pad = model.config.pad_token_id
    for key, g in got.items():
        ref = reference(key)
        if key == "model.embed_tokens.weight" and pad is not None:
            # nn.Embedding(padding_idx=pad) in the HF model zeroes the pad row's gradient from the input
            # side; megatron's embedding (like Megatron-LM training) has no padding_idx
            keep = torch.arange(ref.shape[0]) != pad
            g, ref = g[keep], ref[keep]
        rel = float((g - ref).norm() / ref.norm().clamp_min(1e-30))
        assert rel <= 1e-5, (key, rel)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1pp1"])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_gradients_equal_single_process(parity_runs, layout, name):
    ref, got = full_grads(parity_runs / "tp1pp1", name), full_grads(parity_runs / layout, name)
    assert got.keys() == ref.keys()
    assert any(".lora." in k for k in ref) == ("pure" not in name)
    for key in ref:
        rel = float((got[key] - ref[key]).norm() / ref[key].norm().clamp_min(1e-30))
        assert rel <= 1e-5, (key, rel)


@pytest.mark.slow
@pytest.mark.parametrize("layout, key", [("tp1pp2", "model.layers.0.attn.qkv.weight"),
                                         ("tp2pp1", "model.relax.0.lora.o.lora_B")])
def test_gradient_contracts_are_needed(parity_runs, layout, key):
    """Guards the test above: before finalize_grads, a shared layer's gradient on a CYCLE PP=2 stage is
    only its loop's share, and a row-parallel LoRA B's gradient is a partial sum over TP."""
    ref, raw = full_grads(parity_runs / "tp1pp1", "llama-lora"), full_grads(parity_runs / layout, "llama-lora", "rawgrads")
    assert float((raw[key] - ref[key]).norm() / ref[key].norm()) > 1e-2


@pytest.mark.slow
def test_each_unrolled_layer_runs_in_megatrons_fp8_context_for_it(relaxed, tmp_path):
    # megatron decides per global layer number (FP8 or, for the first/last, bf16); recompute must
    # enter the same context again when it reruns a layer's forward inside backward
    run_world(fp8_context_job, 1, str(relaxed / "llama-lora"), TOKENS, str(tmp_path / "asked.pt"), timeout=300)
    got = torch.load(tmp_path / "asked.pt")
    depth = list(range(got["layers"]))
    assert len(depth) > 2 and got["asked"] == depth + depth[::-1]


@pytest.mark.slow
def test_dist_checkpoint_reshards(relaxed, parity_runs, tmp_path):
    name = "gemma-lora"
    run_world(save_job, 2, str(relaxed / name), 2, 1, str(tmp_path / "ckpt"), timeout=600)
    reference = torch.load(parity_runs / "tp1pp1" / f"{name}.logits.pt")
    # saved at TP=2, loaded at PP=2 (one process reads it without a model: test_megatron_checkpoint_...)
    out = tmp_path / "logits-pp2.pt"
    run_world(load_job, 2, str(relaxed / name), 1, 2, str(tmp_path / "ckpt"), TOKENS, str(out), timeout=600)
    assert (torch.load(out) - reference).abs().max().item() <= 1e-6


def relaxrec(*argv):
    """The CLI in this process (its console script is run as a process in test_cli and test_package)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from relaxrec_megatron.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return SimpleNamespace(returncode=rc, stderr=err.getvalue())


@pytest.mark.parametrize("name", ["neox-lora", "gemma-lora"])
def test_megatron_checkpoint_converts_back_to_both_hf_formats(relaxed, tmp_path, name):
    src = relaxed / name
    assert relaxrec("convert", src, tmp_path / "mcore", "--to", "megatron", "--quiet").returncode == 0
    out = relaxrec("export", "hf-relaxed", tmp_path / "mcore", tmp_path / "back", "--quiet")
    assert out.returncode == 0, out.stderr
    original, back = CheckpointReader(src), CheckpointReader(tmp_path / "back")
    assert back.names() == original.names()
    for n in original.names():
        assert torch.equal(back.get(n), original.get(n)), n
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == original.config
    out = relaxrec("export", "hf-unrolled", tmp_path / "mcore", tmp_path / "unrolled", "--quiet")
    assert out.returncode == 0, out.stderr
    unrolled = AutoModelForCausalLM.from_pretrained(tmp_path / "unrolled").eval()
    assert type(unrolled).__module__.startswith("transformers.models.")
    with torch.no_grad():
        assert (unrolled(TOKENS).logits - hf_logits(src)).abs().max() <= 1e-4


def test_vanilla_hf_converts_straight_to_megatron(tiny_dirs, tmp_path):
    out = relaxrec("convert", tiny_dirs["llama"], tmp_path / "mcore", "--to", "megatron", "--rank", "2", "--quiet")
    assert out.returncode == 0, out.stderr
    cfg = read_config(tmp_path / "mcore")
    assert cfg["lora_ranks"]["q"] == 2 and cfg["num_loops"] == 2


def settings_for(folder, **layout):
    return RelaxedSettings(CheckpointReader(folder).config, ParallelLayout(**layout))


def test_tp_must_divide_heads(relaxed):
    with pytest.raises(UserError, match="TP=3 does not divide num_attention_heads=4"):
        settings_for(relaxed / "llama-lora", tp=3)


def test_tp_and_query_groups_must_nest(relaxed):
    hf = CheckpointReader(relaxed / "llama-lora").config | {"num_attention_heads": 12, "num_key_value_heads": 3}
    with pytest.raises(UserError, match="TP=4 and num_key_value_heads=3: one must divide the other"):
        RelaxedSettings(hf, ParallelLayout(tp=4))


def test_pp_must_fit_the_unrolled_depth(relaxed):
    with pytest.raises(UserError, match="PP=3 does not fit the unrolled depth of 4 layers"):
        settings_for(relaxed / "llama-lora", pp=3)


def test_checkpoint_from_another_recursion_setting(relaxed, tmp_path):
    assert relaxrec("convert", relaxed / "llama-lora", tmp_path / "mcore", "--to", "megatron", "--quiet").returncode == 0
    other = settings_for(relaxed / "llama-pure")
    with pytest.raises(UserError, match="was saved with recursion_strategy='cycle' but the model has "
                                        "recursion_strategy='sequence'"):
        check_compatible(read_config(tmp_path / "mcore"), other, "ckpt")


def test_export_of_a_missing_megatron_checkpoint_is_one_line(tmp_path):
    out = relaxrec("export", "hf-relaxed", tmp_path / "nope", tmp_path / "o")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("groups, columns", [(2, ((0, 4), (4, 2), (6, 2))),  # [q; k; v] per query group
                                             (2, ((0, 4), (6, 2))),  # k has no LoRA
                                             (1, ((0, 5), (5, 5)))])  # [gate; up]
@pytest.mark.parametrize("in_place", [True, False])
def test_add_lora_equals_autograd(groups, columns, in_place):
    """AddLora (hand-written backward), in place and into a copy, vs out + the scattered B z computed
    by plain autograd."""
    from relaxrec_megatron.model.lora_linear import AddLora

    g = torch.Generator().manual_seed(0)
    n = groups * (8 if groups > 1 else 10)
    ranks = tuple(2 + i for i in range(len(columns)))
    base = torch.randn(3, 2, n, dtype=torch.float64, generator=g, requires_grad=True)
    z = torch.randn(3, 2, sum(ranks), dtype=torch.float64, generator=g, requires_grad=True)
    Bs = [torch.randn(groups * w, r, dtype=torch.float64, generator=g, requires_grad=True)
          for (_, w), r in zip(columns, ranks)]

    def reference(base, z, *Bs):
        out = base.reshape(6, groups, n // groups)
        for (start, width), zi, B in zip(columns, z.reshape(6, -1).split(ranks, dim=-1), Bs):
            delta = torch.zeros_like(out)
            delta[:, :, start:start + width] = (zi @ B.t()).view(6, groups, width)
            out = out + delta
        return out.reshape(3, 2, n)

    def add(base, z, *Bs):
        return AddLora.apply(base * 1.0, z, groups, columns, ranks, in_place, *Bs)

    torch.testing.assert_close(add(base, z, *Bs), reference(base, z, *Bs))
    assert torch.autograd.gradcheck(add, (base, z, *Bs))


@pytest.mark.slow
def test_te_row_parallel_lora_gradients_under_sequence_parallelism(tmp_path):
    # the TE variant's LoRA wiring on CPU, TE replaced by tests/te_standin.py
    run_world(te_row_lora_job, 2, str(tmp_path / "grads.pt"), timeout=300)
    got = torch.load(tmp_path / "grads.pt")
    for name in ("local", "te"):
        for factor in ("A", "B"):
            assert torch.allclose(got[name][factor], got["expected"][factor], atol=1e-5), (name, factor)


TE_CASES = ["llama-lora", "gemma-lora", "neox-lora"]


@pytest.mark.slow
def test_te_layers_equal_the_local_layers_under_tp_and_sequence_parallelism(relaxed, tmp_path):
    """The Transformer Engine linears (a stand-in that keeps TE's contract: its output is a view made
    by a custom autograd Function, which may not be modified in place) give the local layers' logits
    and gradients, with LoRA on every linear and per-loop biases."""
    from parity import CASES

    cases = [(name, str(relaxed / name)) for name, _, _ in CASES if name in TE_CASES]
    run_world(te_parity_job, 2, cases, TOKENS, dict(tp=2, pp=1, sp=True), str(tmp_path), timeout=300)
    for name in TE_CASES:
        local, te = (torch.load(tmp_path / f"{name}.{kind}.logits.pt") for kind in ("local", "te"))
        assert (local - te).abs().max().item() <= 1e-5, name
        g_local, g_te = full_grads(tmp_path, f"{name}.local"), full_grads(tmp_path, f"{name}.te")
        assert g_local.keys() == g_te.keys() and any(".lora." in k for k in g_te)
        for key in g_local:
            rel = float((g_te[key] - g_local[key]).norm() / g_local[key].norm().clamp_min(1e-30))
            assert rel <= 1e-5, (name, key, rel)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tp=1, pp=1, recompute=True), dict(tp=1, pp=2)])
def test_fp8_weights_are_recast_once_per_step_before_their_first_fp8_use(relaxed, tmp_path, layout):
    """FP8 with the first and last unrolled layers in bf16: shared layer 0 runs first in bf16, which
    must not use up the step's refresh of its FP8 weight copy. Every shared TE linear recasts exactly
    once per step, at its first FP8 call, under recompute and under the pipeline schedule with two
    micro-batches, and after large weight changes the logits equal a fresh model's."""
    world = layout["tp"] * layout["pp"]
    run_world(te_fp8_job, world, str(relaxed / "llama-lora"), TOKENS, layout, str(tmp_path / "fp8.pt"), timeout=300)
    got = torch.load(tmp_path / "fp8.pt")
    steps = [torch.load(f"{tmp_path / 'fp8.pt'}.calls.rank{r}") for r in range(world)]
    for step, calls in enumerate({f"{r}:{n}": c for r, per_step in enumerate(steps) for n, c in per_step[s].items()}
                                 for s in range(3)):
        fp8_used = [name for name, c in calls.items() if any(fp8 for fp8, _ in c)]
        assert fp8_used, step
        for name in fp8_used:
            fp8_calls = [recast for fp8, recast in calls[name] if fp8]
            assert fp8_calls[0] and sum(fp8_calls) == 1, (step, name, calls[name])
    for step, (logits, fresh) in enumerate(zip(got["logits"], got["fresh"])):
        assert (logits - fresh).abs().max().item() <= 1e-5, step
