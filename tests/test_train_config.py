"""Run configs: every shipped config parses against the trainer's dataclasses; overrides; schedules."""

import re
from pathlib import Path

import pytest
import torch

from relaxrec_megatron.errors import UserError
from relaxrec_megatron.training.config import OptimConfig, load_config, lr_at

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    cfg.validate()
    assert cfg.model.source and cfg.data.blend


def test_gemma_config_is_the_paper_setup():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "gemma-2b-relaxed.yaml")
    r = cfg.model.recursion
    assert (r.loops, r.strategy.value, r.init.value, r.rank, r.lora_init.value) == (2, "cycle", "average", 512, "svd")
    assert cfg.kd.enabled
    assert cfg.tokens() == pytest.approx(60e9, rel=1e-4)


def test_model_recursion_is_the_recursion_spec_of_conversion_and_the_cli(tmp_path):
    """One typed spec: choices become their enums when the config loads, the training default rank
    (512) holds for a YAML that leaves it out, and per-module ranks and targets reach the plan."""
    from relaxrec_megatron.recursion import InitMethod, RecursionSpec, Strategy
    from relaxrec_megatron.training.planning import models

    (tmp_path / "c.yaml").write_text("model: {source: google/gemma-2b, recursion: {loops: 2, init: stepwise}}\n")
    r = load_config(tmp_path / "c.yaml").model.recursion
    assert isinstance(r, RecursionSpec) and (r.strategy, r.init, r.rank) == (Strategy.CYCLE, InitMethod.STEPWISE, 512)
    cfg = load_config(GEMMA, ["model.recursion.strategy=sequence", "model.recursion.module_ranks={down: 8}",
                              "model.recursion.targets=[q, down]", "kd.enabled=false"])
    cfg.validate()
    assert cfg.model.recursion.strategy is Strategy.SEQUENCE
    ranks = models(cfg)[2]["lora_ranks"]
    assert ranks == {"q": 512, "down": 8}, ranks
    for override, message in [("model.recursion.module_ranks={down: -2}", "model.recursion.module_ranks must map"),
                              ("model.recursion.targets=q", "model.recursion.targets must be a list"),
                              ("model.recursion.lora_init=pca", "model.recursion.lora_init must be one of svd, zero")]:
        with pytest.raises(UserError, match=re.escape(message)):
            load_config(GEMMA, [override]).validate()


def test_dotted_overrides(tmp_path):
    cfg = load_config(CONFIGS[0], ["optim.lr=3e-4", "parallel.tp=2", "kd.enabled=false", "run.name=x"])
    assert (cfg.optim.lr, cfg.parallel.tp, cfg.kd.enabled, cfg.run.name) == (3e-4, 2, False, "x")


@pytest.mark.parametrize("text, overrides, message", [
    ("optim: {lr: 1}\nbogus: 1\n", [], "bogus: unknown key"),
    ("optim: {lrr: 1}\n", [], "optim.lrr: unknown key"),
    ("optim: [1, 2]\n", [], "expected a mapping"),
    ("optim: {lr: 1}\n", ["optim.nope=1"], "unknown key 'optim.nope'"),
    ("optim: {lr: 1}\n", ["optim.lr"], "expected dotted.key=value"),
    ("a: [\n", [], "invalid YAML"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, text, overrides, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(tmp_path / "c.yaml", overrides)


def test_validation_catches_layout_errors():
    cfg = load_config(CONFIGS[0], ["parallel.pp=2", "parallel.zero_stage=2"])
    with pytest.raises(UserError, match="ZeRO-2 cannot be combined with pipeline"):
        cfg.validate()
    with pytest.raises(UserError, match="ZeRO-2 cannot be combined with tensor parallelism"):
        load_config(CONFIGS[0], ["parallel.tp=2", "parallel.zero_stage=2"]).validate()
    cfg = load_config(CONFIGS[0], ["optim.global_batch_size=10", "optim.micro_batch_size=4"])
    with pytest.raises(UserError, match="not a multiple of micro_batch_size"):
        cfg.validate(world_size=2)


def test_lr_schedules():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, train_steps=110)
    assert lr_at(0, o) == pytest.approx(0.1) and lr_at(9, o) == pytest.approx(1.0)
    assert lr_at(10, o) == pytest.approx(1.0) and lr_at(110, o) == pytest.approx(0.1)
    assert lr_at(60, o) == pytest.approx(0.55)
    w = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, train_steps=110, schedule="wsd", decay_fraction=0.1)
    assert lr_at(50, w) == 1.0 and lr_at(99, w) == 1.0 and lr_at(110, w) == pytest.approx(0.0)


GEMMA, FP8 = (Path(__file__).parents[1] / "configs" / f"gemma-2b-relaxed{s}.yaml" for s in ("", "-fp8"))


@pytest.mark.parametrize("overrides, message", [
    (["model.fp8_recipe=delayed"], "delayed keeps one amax history per module"),
    (["model.fp8_recipe=perchannel"], "fp8_recipe must be one of tensorwise, blockwise, mxfp8"),
    (["model.fp8_format=e5m2"], "fp8_format must be hybrid or e4m3"),
    (["model.dtype=fp32"], "set model.dtype=bf16"),
])
def test_fp8_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(FP8, overrides).validate()


@pytest.mark.parametrize("overrides, message", [
    (["exit.weights=[0.1, 0.2, 1.0]"], r"exit.weights has 3 entries for a model with 2 loops; .*\[0.1, 1.0\]"),
    (["exit.weights=[0.1, 0]"], "the last loop's weight must be positive"),
    (["exit.weights=[-1, 1]"], "list of non-negative numbers"),
    (["exit.distill=teacher", "kd.enabled=false"], "set kd.enabled=true, or exit.distill=final"),
    (["exit.distill=oracle"], "exit.distill must be one of final, teacher, none"),
    (["model.recursion.strategy=sequence"], "needs model.recursion.strategy=cycle"),
    (["model.recursion.loops=1"], "needs model.recursion.loops >= 2"),
])
def test_exit_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(GEMMA, ["exit.enabled=true", *overrides]).validate()


def test_exit_weights_default_to_the_aggressive_coefficient():
    cfg = load_config(GEMMA, ["exit.enabled=true"])
    cfg.validate()
    assert cfg.exit.loop_weights(3) == [0.1, 0.1, 1.0]


def test_low_precision_weights_need_a_master_copy():
    with pytest.raises(UserError, match="no fp32 master copy; use zero_stage 1 or 2"):
        load_config(GEMMA, ["parallel.zero_stage=0", "model.dtype=bf16"]).validate()
    load_config(GEMMA, ["parallel.zero_stage=0", "model.dtype=fp32"]).validate()


def test_deepspeed_accumulates_low_precision_gradients_in_fp32():
    from relaxrec_megatron.training.trainer import deepspeed_config

    bf16 = deepspeed_config(load_config(GEMMA, ["model.dtype=bf16"]), micro_batches=4, dp=2)
    assert bf16["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(load_config(GEMMA, ["model.dtype=fp32"]), 4, 2)


def test_fp8_config_becomes_megatrons_own_fp8_settings():
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    from relaxrec_megatron.model.settings import RelaxedSettings, transformer_config
    from relaxrec_megatron.training.precision import fp8_settings

    cfg = load_config(FP8)
    cfg.validate()
    got = fp8_settings(cfg.model)
    assert got == {"fp8": "hybrid", "fp8_recipe": "tensorwise", "first_last_layers_bf16": True,
                   "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1}
    assert fp8_settings(load_config(GEMMA).model) == {}
    settings = RelaxedSettings(dict(
        model_type="relaxed_recursive", vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, norm_type="rmsnorm", norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, norm_zero_centered=True,
        hidden_act="gelu_pytorch_tanh", gated_mlp=True, parallel_residual=False, attention_bias=False,
        mlp_bias=False, embedding_multiplier=8.0, tie_word_embeddings=True, num_hidden_layers=18,
        num_shared_layers=9, num_loops=2, recursion_strategy="cycle", layer_plan=None,
        lora_ranks={m: 8 for m in ("q", "k", "v", "o", "gate", "up", "down")}, share_norms=True, share_biases=True))
    config = transformer_config(settings, torch.bfloat16, got)
    assert (config.fp8, config.fp8_recipe, config.num_layers) == ("hybrid", "tensorwise", 18)
    assert [is_first_last_bf16_layer(config, l) for l in range(18)] == [True] + [False] * 16 + [True]
    assert transformer_config(settings, torch.bfloat16).fp8 is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_fp8_without_cuda_is_one_line():
    from relaxrec_megatron.training.precision import check_fp8_runtime

    with pytest.raises(UserError, match="needs a CUDA GPU with FP8.*set model.fp8=false"):
        check_fp8_runtime("tensorwise")


@pytest.mark.parametrize("overrides, message", [
    (["optim.micro_batch_size=0"], "optim.micro_batch_size must be > 0, got 0"),
    (["optim.train_steps=-1"], "optim.train_steps must be > 0, got -1"),
    (["optim.train_steps=0"], "optim.train_steps must be > 0, got 0"),
    (["optim.train_steps=2.5"], "optim.train_steps: expected an integer, got 2.5"),
    (["optim.global_batch_size=0"], "optim.global_batch_size must be > 0"),
    (["optim.lr=-1"], "optim.lr must be > 0, got -1"),
    (["optim=3"], "optim is a section; set one of its keys"),
    (["model.recursion.strategy=bogus"], "model.recursion.strategy must be one of cycle, sequence, got 'bogus'"),
    (["model.recursion.init=bogus"], "model.recursion.init must be one of stepwise, average, lower, upper"),
    (["checkpoint.save_every=0"], "checkpoint.save_every must be > 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last must be > 0, got 0"),
    (["checkpoint.keep_last=-2"], "checkpoint.keep_last must be > 0, got -2"),
    (["logging.every=0"], "logging.every must be > 0"),
    (["data.seq_length=0"], "data.seq_length must be > 0"),
    (["kd.enabled=maybe"], "kd.enabled: expected true or false, got 'maybe'"),
    (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["parallel.stall_factor=1"], "parallel.stall_factor must be > 1"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
])
def test_every_bad_setting_is_one_line_naming_its_key(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(GEMMA, overrides).validate()
