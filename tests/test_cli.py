"""CLI behaviour, bad input included: one-line error, non-zero exit, no partial output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from relaxrec_megatron.cli.main import main
from relaxrec_megatron.hf.convert import REPORT_FILE


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def run_error(capsys, argv, out: Path) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not out.exists()
    assert leftovers(out.parent) == []
    assert len(err) == 1, err
    return err[0]


def copy_src(tiny_dirs, arch, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dirs[arch], tmp_path / "src"))


def test_convert_then_export_through_the_cli(tiny_dirs, tmp_path, capsys):
    rel, unr = tmp_path / "rel", tmp_path / "unr"
    assert main(["convert", str(tiny_dirs["gpt_neox"]), str(rel), "--rank", "full", "--per-layer-norms",
                 "--per-layer-biases", "--strategy", "sequence", "--module-rank", "down=3"]) == 0
    out = capsys.readouterr().out
    assert "relative reconstruction error" in out and "down=3" in out
    assert (rel / "relaxation_report.json").is_file()
    cfg = json.loads((rel / "config.json").read_text())
    assert cfg["lora_ranks"]["down"] == 3 and cfg["lora_ranks"]["q"] == 32 and cfg["recursion_strategy"] == "sequence"
    assert main(["export", "hf-unrolled", str(rel), str(unr), "--quiet"]) == 0
    assert AutoModelForCausalLM.from_pretrained(unr).config.model_type == "gpt_neox"


def test_targets_and_dtype(tiny_dirs, tmp_path):
    rel = tmp_path / "rel"
    assert main(["convert", str(tiny_dirs["llama"]), str(rel), "--rank", "4", "--targets", "q,v", "--dtype", "bf16",
                 "--quiet"]) == 0
    cfg = json.loads((rel / "config.json").read_text())
    assert cfg["lora_ranks"] == {"q": 4, "v": 4} and cfg["dtype"] == "bfloat16"
    tensors = load_file(rel / "model-layer-00000.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}


def test_loops_not_dividing_layers(tiny_dirs, tmp_path, capsys):
    msg = run_error(capsys, ["convert", str(tiny_dirs["llama"]), str(tmp_path / "o"), "--loops", "3"], tmp_path / "o")
    assert "loops=3 does not divide" in msg and "[1, 2, 4]" in msg


@pytest.mark.parametrize("rank", ["-3", "abc"])
def test_bad_rank_is_an_argument_error(tiny_dirs, tmp_path, capsys, rank):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tiny_dirs["llama"]), str(tmp_path / "o"), "--rank", rank])
    assert e.value.code == 2
    assert "rank must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_the_architecture_lacks(tiny_dirs, tmp_path, capsys):
    msg = run_error(capsys, ["convert", str(tiny_dirs["gpt_neox"]), str(tmp_path / "o"), "--module-rank", "gate=4"],
                    tmp_path / "o")
    assert "gpt_neox has no 'gate' linear" in msg


def test_unknown_architecture(tiny_dirs, tmp_path, capsys):
    src = copy_src(tiny_dirs, "llama", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "bert"
    (src / "config.json").write_text(json.dumps(cfg))
    msg = run_error(capsys, ["convert", str(src), str(tmp_path / "o")], tmp_path / "o")
    assert "unsupported architecture model_type='bert'" in msg and "llama" in msg


def test_missing_weights(tiny_dirs, tmp_path, capsys):
    src = copy_src(tiny_dirs, "llama", tmp_path)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    msg = run_error(capsys, ["convert", str(src), str(tmp_path / "o")], tmp_path / "o")
    assert "missing tensor 'model.layers.3.mlp.down_proj.weight'" in msg


def test_mismatched_weights(tiny_dirs, tmp_path, capsys):
    src = copy_src(tiny_dirs, "gemma", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (src / "config.json").write_text(json.dumps(cfg))
    msg = run_error(capsys, ["convert", str(src), str(tmp_path / "o"), "--rank", "2"], tmp_path / "o")
    assert "model.layers.0.mlp.gate_proj.weight has shape (48, 32) but config.json implies (50, 32)" in msg


def test_existing_output_needs_overwrite(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", str(tiny_dirs["llama"]), str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
    assert main(["convert", str(tiny_dirs["llama"]), str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_threads_and_svd_method(tiny_dirs, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        msg = run_error(capsys, ["convert", str(tiny_dirs["llama"]), str(tmp_path / "o"), "--threads", "0"], tmp_path / "o")
        assert msg == "relaxrec convert: error: --threads must be >= 1, got 0"
        assert main(["convert", str(tiny_dirs["llama"]), str(tmp_path / "o"), "--rank", "2", "--svd", "randomized",
                     "--threads", "1", "--device", "cpu", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "o" / REPORT_FILE).read_text())["svd"] == "randomized"
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_console_script_error_is_one_line(tiny_dirs, tmp_path):
    exe = Path(sys.executable).parent / "relaxrec"
    out = subprocess.run([str(exe), "convert", str(tiny_dirs["llama"]), str(tmp_path / "o"), "--loops", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "relaxrec convert: error: loops=3 does not divide the source's 4 layers; choose one of [1, 2, 4]"]


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt_neox"])
def test_convert_rank_full_is_the_source_exactly_on_every_architecture(tiny_dirs, tmp_path, capsys, arch):
    """--rank full alone keeps each layer's norms and biases (and says so): the logits are the source's."""
    import torch

    assert main(["convert", str(tiny_dirs[arch]), str(tmp_path / "rel"), "--rank", "full"]) == 0
    assert "--rank full: every unrolled layer keeps its own norms and biases" in capsys.readouterr().err
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "rel", dtype=torch.float32)(ids).logits
    assert (ref - got).abs().max().item() <= 1e-4
