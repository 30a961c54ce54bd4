"""relaxrec plan: every shipped run config sized on its GPUs. That the planned parameter and
optimizer bytes equal the trainer's own allocations (ZeRO 0/1/2, DP 1/2, TP 2, PP 2, bf16), and the
data-parallel bytes what DeepSpeed's collectives are handed, is checked in test_training, on the
ranks of those runs."""

import pytest

from relaxrec_megatron.cli.main import main
from relaxrec_megatron.hf.convert import layer_shapes
from relaxrec_megatron.recursion import SharingPlan
from relaxrec_megatron.recursion.params import count_params
from relaxrec_megatron.shipped import hf_config, run_config_names
from relaxrec_megatron.training import memory
from relaxrec_megatron.training.config import load_config
from relaxrec_megatron.training.planning import plan, suggestions

GPUS = {"tiny-cpu": 2, "smollm2-135m-exits-cpu": 2, "pythia-1b-relaxed": 8}  # the rest: 8 data-parallel GPUs


@pytest.mark.parametrize("name", run_config_names())
def test_every_shipped_run_fits_80gb_gpus(name, capsys):
    assert main(["plan", name, "--gpus", str(GPUS.get(name, 8))]) == 0
    out = capsys.readouterr().out
    assert "[plan] fits:" in out and "GPU-hours" in out and "of 80 GB" in out
    got = plan(load_config(name), GPUS.get(name, 8))
    assert got["fits"] and got["total"] <= 0.9 * 80e9


@pytest.mark.parametrize("model", ["gemma-2b", "tinyllama-1.1b", "pythia-1b", "smollm2-135m"])
def test_one_gpu_holds_the_parameters_the_counts_give(model):
    """At TP = PP = 1 the planner's per-rank parameters are the whole relaxed model (recursion.params)."""
    adapter, shapes = layer_shapes(hf_config(model))
    plan_ = SharingPlan(adapter.num_layers, 2, "cycle")
    ranks = {m: 512 for m in shapes.linears}
    sized = memory.Model(shapes, plan_, ranks)
    assert memory.params(sized, memory.Layout(), 0) == count_params(shapes, plan_.num_layers, 2, ranks).total
    # two pipeline stages hold every shared layer once per stage that runs it, and a tied
    # embedding twice (the last stage's output layer)
    two = [memory.params(sized, memory.Layout(pp=2), s) for s in (0, 1)]
    layer = sum(o * i for o, i in shapes.linears.values())
    assert sum(two) - count_params(shapes, plan_.num_layers, 2, ranks).total >= plan_.num_shared * layer
    # without LoRA, TP=4 splits everything but the norms and the row-parallel (o, down) biases
    pure = count_params(shapes, plan_.num_layers, 2)
    row_bias = plan_.num_shared * sum(shapes.linears[m][0] for m in ("o", "down") if shapes.linear_bias.get(m))
    kept = pure.norms + row_bias
    assert memory.params(memory.Model(shapes, plan_), memory.Layout(tp=4), 0) == (pure.total - kept) // 4 + kept


def test_a_run_that_does_not_fit_names_the_changes_that_would(capsys):
    cfg = load_config("gemma-2b-relaxed", ["parallel.recompute=false", "optim.micro_batch_size=8"])
    assert not plan(cfg, 8)["fits"]
    assert main(["plan", "gemma-2b-relaxed", "parallel.recompute=false", "optim.micro_batch_size=8",
                 "--gpus", "8"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "parallel.recompute=true" in out
    fixes = suggestions(cfg, 8, "h100", 0.4)
    assert fixes and all(total <= 0.9 * 80e9 for _, total in fixes)
    for label, _ in fixes:  # each one, applied, fits
        assert plan(load_config("gemma-2b-relaxed", ["parallel.recompute=false", "optim.micro_batch_size=8",
                                                     *label.split()]), 8)["fits"], label


def test_logits_and_recompute_move_the_terms_they_should():
    cfg = load_config("gemma-2b-relaxed")
    base = plan(cfg, 8)["stages"][0]
    # 4 x 2048 tokens x 256000 vocabulary in bf16: the student's, the teacher's and the gradient's
    assert base["logits"] >= 3 * 4 * 2048 * 256000 * 2
    no_kd = plan(load_config("gemma-2b-relaxed", ["kd.enabled=false"]), 8)["stages"][0]
    assert no_kd["teacher weights"] == 0
    off = plan(load_config("gemma-2b-relaxed", ["parallel.recompute=false"]), 8)["stages"][0]
    assert off["activations"] > 10 * base["activations"]
    z2 = plan(load_config("tinyllama-1.1b-relaxed"), 8)["stages"][0]
    z1 = plan(load_config("tinyllama-1.1b-relaxed", ["parallel.zero_stage=1"]), 8)["stages"][0]
    assert z2["gradients"] < z1["gradients"] and z2["Adam moments"] == z1["Adam moments"]


def test_dp_traffic_follows_the_zero_stage_the_micro_batches_and_the_reduction_dtype(capsys):
    # that these bytes are what DeepSpeed's collectives are handed: test_training, on DP=2 runs
    def traffic(*overrides, gpus=64):
        return plan(load_config("gemma-2b-relaxed", list(overrides)), gpus)["dp_traffic"]

    z1, n = traffic(), plan(load_config("gemma-2b-relaxed"), 64)["student_params"]
    assert z1["bytes"] == pytest.approx(2 * n + 2 * n, rel=1e-6)  # bf16 all-reduce, bf16 all-gather
    assert traffic("optim.micro_batch_size=2")["bytes"] == z1["bytes"]  # once per step, whatever the micro-batches
    assert traffic("parallel.grad_reduce_dtype=fp32")["bytes"] == pytest.approx(4 * n + 2 * n, rel=1e-6)
    z2 = traffic("parallel.zero_stage=2")  # 1024 / (4 x 64) = 4 micro-batches, each all-reduced
    assert z2["bytes"] == pytest.approx(4 * 2 * n + 2 * n, rel=1e-6) and z2["overlapped"] > 0 == z1["overlapped"]
    assert traffic(gpus=1)["bytes"] == 0
    assert main(["plan", "gemma-2b-relaxed", "--gpus", "64", "--link-gbps", "200"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "DP gradient traffic" in x][0]
    assert f"{z1['wire'] / 25e9:.2f} s at 200 Gb/s" in line, line


@pytest.mark.parametrize("argv, message", [
    (["pythia-1b-relaxed", "--gpus", "6"], "not a multiple of TP*PP = 4"),
    (["gemma-2b-relaxed", "--gpus", "0"], "--gpus must be at least 1"),
    (["gemma-2b-relaxed", "--gpus", "8", "--mfu", "2"], "--mfu must be in (0, 1]"),
    (["nosuch", "--gpus", "8"], "no such config file"),
    (["gemma-2b-relaxed", "--gpus", "8", "--link-gbps", "0"], "--link-gbps must be positive"),
    (["gemma-2b-relaxed", "parallel.grad_reduce_dtype=bf16", "--gpus", "8"], "parallel.grad_reduce_dtype must be one of model, fp32"),
])
def test_bad_plan_input_is_one_line(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
