"""Parameter figures of the paper's models (shared/notes/paper.md), from the shipped config.json files."""

import json

import pytest

from relaxrec_megatron.cli.main import main
from relaxrec_megatron.hf.arch import adapter_for
from relaxrec_megatron.shipped import MODELS as SHIPPED


def params_json(capsys, *argv):
    assert main(["params", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "model, shared, lora",
    [
        ("gemma-2b", 0.991e9, {64: 78e6, 128: 157e6, 256: 314e6, 512: 606e6}),
        ("tinyllama-1.1b", 0.484e9, {64: 50e6, 128: 101e6, 256: 202e6, 512: 378e6}),
    ],
)
def test_paper_parameter_figures(capsys, model, shared, lora):
    out = params_json(capsys, model, "--loops", "2", "--rank", "0", "64", "128", "256", "512")
    rows = {r["rank"]: r for r in out["rows"]}
    assert rows[None]["linears"] == pytest.approx(2 * shared, rel=0.01)
    assert rows[0]["linears"] == pytest.approx(shared, rel=0.01)
    assert rows[0]["lora"] == 0
    for rank, expected in lora.items():
        assert rows[rank]["lora"] == pytest.approx(expected, rel=0.01), rank
        assert rows[rank]["linears"] == rows[0]["linears"]


def test_gemma_r512_total_non_embedding(capsys):
    out = params_json(capsys, "gemma-2b", "--rank", "512")
    assert out["rows"][1]["non_embedding"] == pytest.approx(1.60e9, rel=0.01)


def test_full_rank_clips_per_module(capsys):
    out = params_json(capsys, "gemma-2b", "--rank", "full")
    assert out["rows"][1]["module_ranks"] == {"q": 2048, "k": 256, "v": 256, "o": 2048, "gate": 2048, "up": 2048, "down": 2048}


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_model_config_parses(path):
    adapter = adapter_for(json.loads(path.read_text()))
    assert adapter.num_layers > 0 and adapter.linear_shapes()


def test_params_works_from_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text((SHIPPED / "pythia-1b.json").read_text())
    out = params_json(capsys, str(cfg), "--rank", "0")
    assert out["layers"] == 16 and out["shared_layers"] == 8
    assert "gate" not in out["rows"][1]["module_ranks"]
