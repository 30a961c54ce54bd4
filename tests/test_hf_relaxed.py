"""The HF-side relaxed recursive model against HF transformers (the independent reference), fp32 on CPU."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import WITHOUT_PACKAGE
from transformers import AutoModelForCausalLM

from relaxrec_megatron.hf.checkpoint import CheckpointReader
from relaxrec_megatron.hf.convert import REPORT_FILE, RecursionSpec, convert_to_relaxed
from relaxrec_megatron.hf.export import export_unrolled
from relaxrec_megatron.recursion import SharingPlan

ARCHS = ("llama", "gemma", "gpt_neox")
LOGIT_TOL = 1e-4


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def ids_batch(seed=0, shape=(2, 13)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def full_rank_spec(strategy, loops=2):
    return RecursionSpec(loops=loops, strategy=strategy, rank=-1, share_norms=False, share_biases=False)


@pytest.mark.parametrize("strategy", ["cycle", "sequence"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_reproduces_the_source(tiny_dirs, tmp_path, arch, strategy):
    src = tiny_dirs[arch]
    convert_to_relaxed(str(src), tmp_path / "rel", full_rank_spec(strategy), progress=False)
    ref, rel = load(src), load(tmp_path / "rel")
    ids = ids_batch()
    diff = (logits(ref, ids) - logits(rel, ids)).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    prompt = ids[:1, :5]
    kw = dict(max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)
    assert torch.equal(ref.generate(prompt, **kw), rel.generate(prompt, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_norms_are_not_silently_exact(tiny_dirs, tmp_path, arch):
    """Guards the test above: the tiny models' norms differ per layer, so sharing them must change logits."""
    src = tiny_dirs[arch]
    convert_to_relaxed(str(src), tmp_path / "rel", RecursionSpec(rank=-1), progress=False)
    assert (logits(load(src), ids_batch()) - logits(load(tmp_path / "rel"), ids_batch())).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_unrolled_export_reproduces_source_weights(tiny_dirs, tmp_path, arch):
    src = tiny_dirs[arch]
    convert_to_relaxed(str(src), tmp_path / "rel", full_rank_spec("cycle"), progress=False)
    export_unrolled(tmp_path / "rel", tmp_path / "unrolled", progress=False)
    original, exported = load_file(src / "model.safetensors"), CheckpointReader(tmp_path / "unrolled")
    assert exported.names() == set(original)
    for name, t in original.items():
        torch.testing.assert_close(exported.get(name), t, atol=1e-5, rtol=0, msg=name)
    config = json.loads((tmp_path / "unrolled" / "config.json").read_text())
    assert config["model_type"] == arch and "auto_map" not in config
    model = load(tmp_path / "unrolled")  # vanilla transformers, no custom code
    assert type(model).__module__.startswith("transformers.models.")
    assert (logits(model, ids_batch()) - logits(load(src), ids_batch())).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("strategy", ["cycle", "sequence"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rank0_lower_init_is_the_first_k_layers_looped(tiny_dirs, tmp_path, arch, strategy):
    src = tiny_dirs[arch]
    convert_to_relaxed(str(src), tmp_path / "rel", RecursionSpec(loops=2, strategy=strategy, init="lower", rank=0),
                       progress=False)
    rel = load(tmp_path / "rel")
    # independent construction: a vanilla HF model whose layer l is a copy of source layer shared(l)
    ref = load(src)
    base = ref.gpt_neox if arch == "gpt_neox" else ref.model
    plan = SharingPlan(len(base.layers), 2, strategy)
    originals = [copy.deepcopy(layer) for layer in base.layers]
    for l in range(plan.num_layers):
        layer = copy.deepcopy(originals[plan.shared_index(l)])
        (layer.attention if arch == "gpt_neox" else layer.self_attn).layer_idx = l
        base.layers[l] = layer
    diff = (logits(ref, ids_batch()) - logits(rel, ids_batch())).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    assert sum(p.numel() for p in rel.parameters()) < sum(p.numel() for p in load(src).parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_reconstruction_error_falls_with_rank(tiny_dirs, tmp_path, arch):
    means = []
    for rank in (0, 2, 8, -1):
        report = convert_to_relaxed(str(tiny_dirs[arch]), tmp_path / f"r{rank}", RecursionSpec(rank=rank), progress=False)
        stored = json.loads((tmp_path / f"r{rank}" / REPORT_FILE).read_text())
        assert stored["rows"] == report["rows"]
        means.append(sum(r["rel_error"] for r in report["rows"]) / len(report["rows"]))
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[-1] < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_starts_at_the_recursive_model(tiny_dirs, tmp_path, arch):
    src = tiny_dirs[arch]
    convert_to_relaxed(str(src), tmp_path / "r0", RecursionSpec(rank=0), progress=False)
    convert_to_relaxed(str(src), tmp_path / "z", RecursionSpec(rank=8, lora_init="zero"), progress=False)
    zero = load(tmp_path / "z")
    assert any(len(slot.lora) for slot in zero.model.relax)
    torch.testing.assert_close(logits(zero, ids_batch()), logits(load(tmp_path / "r0"), ids_batch()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_compact_checkpoint_round_trip_is_exact(tiny_dirs, tmp_path, arch):
    convert_to_relaxed(str(tiny_dirs[arch]), tmp_path / "rel", RecursionSpec(rank=4, strategy="sequence"), progress=False)
    model = load(tmp_path / "rel")
    model.save_pretrained(tmp_path / "again")
    again = load(tmp_path / "again")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(model, ids_batch()), logits(again, ids_batch()))
    cfg = again.config
    assert (cfg.num_loops, cfg.recursion_strategy, cfg.shared_init, cfg.lora_init) == (2, "sequence", "average", "svd")
    assert cfg.source_model == str(tiny_dirs[arch]) and cfg.source_model_type == arch
    assert set(cfg.lora_ranks.values()) == {4}


def test_parameter_count_shows_the_saving(tiny_dirs, tmp_path):
    src = tiny_dirs["llama"]
    convert_to_relaxed(str(src), tmp_path / "rel", RecursionSpec(rank=0), progress=False)
    rel, ref = load(tmp_path / "rel"), load(src)
    n_layer = sum(p.numel() for p in ref.model.layers[0].parameters())
    assert sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in rel.parameters()) == 2 * n_layer


def test_batched_left_padded_generation_matches_hf(tiny_dirs, tmp_path):
    src = tiny_dirs["llama"]
    convert_to_relaxed(str(src), tmp_path / "rel", full_rank_spec("cycle"), progress=False)
    ref, rel = load(src), load(tmp_path / "rel")
    ids = ids_batch(3, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), rel.generate(ids, **kw))


BLOCK_PACKAGE = WITHOUT_PACKAGE + """
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert 'relaxrec_megatron' not in sys.modules
ids = torch.arange(12)[None] % 90
with torch.no_grad():
    print(repr(m(ids).logits.sum().item()))
"""


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(tiny_dirs, tmp_path):
    convert_to_relaxed(str(tiny_dirs["gemma"]), tmp_path / "rel", RecursionSpec(rank=4), progress=False)
    out = subprocess.run([sys.executable, "-c", BLOCK_PACKAGE, str(tmp_path / "rel")], capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    expected = logits(load(tmp_path / "rel"), torch.arange(12)[None] % 90).sum().item()
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)


def test_pytorch_bin_checkpoints_convert_too(tmp_path):
    from tiny import tiny_model

    model = tiny_model("llama", seed=3)
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the pre-safetensors format
    convert_to_relaxed(str(tmp_path / "bin"), tmp_path / "rel", full_rank_spec("cycle"), progress=False)
    assert (logits(model, ids_batch()) - logits(load(tmp_path / "rel"), ids_batch())).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("gated", [True, False])
def test_the_checkpoints_own_copy_of_the_linears_is_the_packages(gated):
    # hf/modeling_relaxrec.py travels alone with every checkpoint, so it keeps its own copy of
    # recursion.linears: the same names and shapes
    from relaxrec_megatron.hf import modeling_relaxrec as remote
    from relaxrec_megatron.hf.configuration_relaxrec import RelaxedRecursiveConfig
    from relaxrec_megatron.recursion import linears

    assert (remote.ATTN, remote.MLP) == (linears.ATTENTION, linears.MLP)
    config = RelaxedRecursiveConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=24, gated_mlp=gated)
    assert remote.linear_shapes(config) == linears.linear_shapes(64, 4, 2, 24, 96, gated)
    assert list(remote.linear_shapes(config)) == list(linears.linears(gated))
