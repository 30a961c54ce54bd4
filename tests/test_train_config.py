"""Run configs: every shipped config parses against the trainer's dataclasses; overrides; schedules."""

from pathlib import Path

import pytest

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
    assert (r.loops, r.strategy, r.init, r.rank, r.lora_init) == (2, "cycle", "average", 512, "svd")
    assert cfg.kd.enabled
    assert cfg.tokens() == pytest.approx(60e9, rel=1e-4)


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
