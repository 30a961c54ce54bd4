"""relaxrec eval: lm-evaluation-harness tasks (offline local tasks), corpus perplexity, and the models
they score (relaxed, vanilla, Megatron checkpoints), against the source model and plain-torch references."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from relaxrec_megatron.cli.main import main
from relaxrec_megatron.data.pydoc_text import pydoc_topics
from relaxrec_megatron.evaluation.local_tasks import (
    LASTWORD,
    TASKS_DIR,
    continuation_samples,
    lastword_samples,
    sentences,
)
from relaxrec_megatron.evaluation.ppl import token_nlls, windows
from relaxrec_megatron.hf.convert import RecursionSpec, convert_to_relaxed
from relaxrec_megatron.hf.smollm import smollm_checkpoint
from relaxrec_megatron.model.convert_megatron import relaxed_to_megatron
from relaxrec_megatron.model.steps import write_manifest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer; its full-rank (per-layer norms) and rank-4 conversions;
    the rank-4 one as a Megatron dist checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = AutoTokenizer.from_pretrained(smollm_checkpoint())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # layers that differ visibly, norms that differ between tied layers
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.05))
    model.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    convert_to_relaxed(str(root / "src"), root / "full", RecursionSpec(rank=-1, share_norms=False), progress=False)
    convert_to_relaxed(str(root / "src"), root / "r4", RecursionSpec(rank=4), progress=False)
    relaxed_to_megatron(root / "r4", root / "megatron")
    return root


def eval_json(argv, out: Path) -> dict:
    assert main([*argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def samples(report, name, task):
    return report["models"][name]["samples"][task]


@pytest.mark.slow
def test_full_rank_scores_exactly_as_the_source(models, tmp_path, capsys):
    src, full = str(models / "src"), str(models / "full")
    report = eval_json(["eval", "tasks", src, full, "--tasks", "local", "--limit", "12"], tmp_path / "r.json")
    for task in ("relaxrec_pydoc_lastword", "relaxrec_pydoc_continuation"):
        a, b = samples(report, src, task), samples(report, full, task)
        assert len(a) == len(b) == 12
        for x, y in zip(a, b):
            assert x["doc_id"] == y["doc_id"]
            assert {m: v for m, v in x["metrics"].items() if m.startswith("acc")} == \
                {m: v for m, v in y["metrics"].items() if m.startswith("acc")}  # the same decisions
            assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-3, rel=1e-5)
        assert report["models"][src]["results"][task] == pytest.approx(report["models"][full]["results"][task],
                                                                        rel=1e-5)
    assert report["models"][full]["kind"] == "relaxed" and report["models"][src]["kind"] == "vanilla"
    table = capsys.readouterr().out
    assert re.search(r"relaxrec_pydoc_lastword \(0-shot\)\s+acc", table) and "mean accuracy" in table


@pytest.mark.slow
def test_megatron_checkpoints_score_as_their_hf_export(models, tmp_path):
    # a training run's layout: checkpoints/latest -> step_N/model, the tokenizer in the run's init/student
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000007"
    shutil.copytree(models / "megatron", step / "model")
    for f in (step / "model").glob("tokenizer*"):
        f.unlink()
    (step / "trainer_state.json").write_text("{}")
    write_manifest(step)  # complete, as the trainer leaves it
    (run / "checkpoints" / "latest").write_text(step.name)
    shutil.copytree(models / "r4", run / "init" / "student")
    refs = [str(models / "r4"), str(models / "megatron"), str(step), str(run / "checkpoints")]
    report = eval_json(["eval", "tasks", *refs, "--tasks", LASTWORD, "--limit", "10"], tmp_path / "r.json")
    base = samples(report, refs[0], LASTWORD)
    for ref in refs[1:]:
        assert report["models"][ref]["kind"] == "megatron"
        assert samples(report, ref, LASTWORD) == base  # the same tensors: bit for bit


@pytest.mark.slow
def test_untrained_rank0_scores_below_the_source(tmp_path):
    """The real SmolLM2-135M against its pure recursive (rank 0) conversion before any uptraining."""
    source = str(smollm_checkpoint())
    convert_to_relaxed(source, tmp_path / "r0", RecursionSpec(loops=2, rank=0), progress=False)
    report = eval_json(["eval", "tasks", source, str(tmp_path / "r0"), "--tasks", LASTWORD, "--limit", "12"],
                       tmp_path / "r.json")
    src, r0 = (report["models"][k]["results"] for k in (source, str(tmp_path / "r0")))
    assert src[LASTWORD]["acc"] >= 0.4  # the source model solves these
    assert r0[LASTWORD]["acc"] < src[LASTWORD]["acc"] - 0.2
    assert r0[LASTWORD]["perplexity"] > 10 * src[LASTWORD]["perplexity"]


@pytest.mark.slow
def test_a_users_task_folder(models, tmp_path):
    data = tmp_path / "tasks" / "words.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"q": "one two three", "a": w}) + "\n" for w in ("four", "five")))
    (tmp_path / "tasks" / "words.yaml").write_text(f"""
task: my_words
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{' ' + a}}}}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""")
    report = eval_json(["eval", "tasks", str(models / "src"), "--tasks", "my_words",
                        "--include-path", str(tmp_path / "tasks")], tmp_path / "r.json")
    got = samples(report, str(models / "src"), "my_words")
    assert [s["target"] for s in got] == [" four", " five"]
    # the harness's loglikelihood of the target equals the model's, computed here
    model = AutoModelForCausalLM.from_pretrained(models / "src").eval()
    tok = AutoTokenizer.from_pretrained(models / "src")
    ctx, full = tok("one two three").input_ids, tok("one two three four").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    ref = sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))
    assert got[0]["loglikelihoods"][0] == pytest.approx(ref, abs=1e-4)


def run_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path, capsys):
    out = tmp_path / "r.json"
    src = str(models / "src")
    assert "unknown task 'hellaswagg'" in run_error(capsys, ["eval", "tasks", src, "--tasks", "hellaswagg",
                                                             "--output", str(out)])
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint" in run_error(capsys, ["eval", "tasks", src, str(tmp_path / "empty"), "--tasks",
                                                    "local", "--output", str(out)])
    assert "cannot load a tokenizer" in run_error(capsys, ["eval", "tasks", src, "--tasks", "local", "--tokenizer",
                                                           str(tmp_path / "empty"), "--output", str(out)])
    small = Path(shutil.copytree(models / "src", tmp_path / "small-vocab"))  # a tokenizer the model cannot embed
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 96}))
    assert f"has {cfg['vocab_size']} tokens but the model's vocabulary is 96" in run_error(
        capsys, ["eval", "tasks", str(small), "--tasks", "local", "--output", str(out)])
    no_tok = tmp_path / "megatron"
    shutil.copytree(models / "megatron", no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    cfg = json.loads((no_tok / "relaxrec_config.json").read_text())
    cfg["source_model"] = str(tmp_path / "gone")
    (no_tok / "relaxrec_config.json").write_text(json.dumps(cfg))
    assert "cannot load a tokenizer" in run_error(capsys, ["eval", "tasks", str(no_tok), "--tasks", "local",
                                                           "--output", str(out)])
    assert "no such folder" in run_error(capsys, ["eval", "tasks", src, "--include-path", str(tmp_path / "nope"),
                                                  "--output", str(out)])
    (tmp_path / "tasks").mkdir()  # a task whose data file is not there
    (tmp_path / "tasks" / "t.yaml").write_text(f"task: gone\ndataset_path: json\ndataset_kwargs: {{data_files: "
                                               f"{{test: {tmp_path}/gone.jsonl}}}}\noutput_type: loglikelihood\n"
                                               "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    assert "cannot read the data of gone" in run_error(capsys, ["eval", "tasks", src, "--tasks", "gone",
                                                                "--include-path", str(tmp_path / "tasks"),
                                                                "--output", str(out)])
    assert "no such file" in run_error(capsys, ["eval", "ppl", src, "--data", str(tmp_path / "none.jsonl")])
    assert "--stride 64 is larger" in run_error(capsys, ["eval", "ppl", src, "--data", "x.txt", "--context", "32",
                                                         "--stride", "64"])
    if not torch.cuda.is_available():
        assert "--device cuda" in run_error(capsys, ["eval", "tasks", src, "--device", "cuda", "--output", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))


# -- perplexity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,context,stride", [(1, 4, 2), (2, 4, 4), (17, 8, 3), (16, 8, 8), (30, 5, 1)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin <= first - 1 and end < n
        # a scored token sees at least context - stride + 1 tokens, or all before it
        assert first - begin >= min(first, context - stride + 1)
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def test_sliding_nlls_equal_a_token_by_token_reference(models):
    model = AutoModelForCausalLM.from_pretrained(models / "r4").eval()
    ids = torch.randint(0, 1000, (37,), generator=torch.Generator().manual_seed(1))
    context, stride = 12, 5
    got = token_nlls(model, ids, context, stride, batch_size=3)
    ref = torch.empty(36, dtype=torch.float64)
    with torch.no_grad():
        for begin, end, first in windows(37, context, stride):
            for p in range(first, end + 1):  # the token at p, predicted from ids[begin:p] alone
                logp = torch.log_softmax(model(ids[None, begin:p]).logits[0, -1].float(), -1)
                ref[p - 1] = -logp[ids[p]].double()
    assert (got - ref).abs().max() <= 1e-4


def test_ppl_cli_side_by_side(models, tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The quick brown fox jumps over the lazy dog. " * 6, "A second document, shorter than the first.")))
    out = tmp_path / "p.json"
    src, full = str(models / "src"), str(models / "full")
    assert main(["eval", "ppl", src, full, "--data", str(tmp_path / "c.jsonl"), "--context", "16",
                 "--stride", "8", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]
    assert rows[0]["documents"] == 2 and rows[0]["tokens"] == rows[1]["tokens"] > 60
    assert rows[0]["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-4)
    # the whole corpus under the model, token by token, gives the same perplexity
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    nll = sum(float(token_nlls(model, torch.tensor(tok(json.loads(line)["text"]).input_ids), 16, 8).sum())
              for line in (tmp_path / "c.jsonl").read_text().splitlines())
    assert rows[0]["nll"] == pytest.approx(nll, rel=1e-6)
    assert "perplexity" in capsys.readouterr().out


# -- the shipped offline tasks ----------------------------------------------------------------------

def _norm(text: str) -> str:
    return " ".join(text.split())


def test_local_tasks_come_from_held_out_text_only():
    from relaxrec_megatron.data.pydoc_text import pydoc_topics

    held, train = _norm("\n".join(pydoc_topics("heldout"))), _norm("\n".join(pydoc_topics("train")))
    lastword = [json.loads(l) for l in (TASKS_DIR / "pydoc_lastword.jsonl").read_text().splitlines()]
    cont = [json.loads(l) for l in (TASKS_DIR / "pydoc_continuation.jsonl").read_text().splitlines()]
    assert len(lastword) >= 60 and len(cont) >= 100
    for s in lastword:
        paragraph = s["context"].splitlines()[-1]
        sentence = _norm(sentences(paragraph)[-1] + " " + s["target"])  # the target's own sentence
        assert re.search(rf"\b{s['target']}\b", s["context"], re.IGNORECASE)
        assert sentence in held and sentence not in train
    for s in cont:
        true = s["endings"][s["label"]]
        assert len(set(s["endings"])) == 4 and _norm(s["context"] + " " + true) in held
        assert _norm(true) not in train and _norm(s["context"]) not in train


def test_task_builders_on_a_small_text():
    text = ("Title\n*****\n\nThe mouse sat on the mat near the door. Later the dog came and sat on the mouse.\n\n"
            "   code_block = 1\n\nA bird flew over the house and the tree today. Then the bird landed on the tree.")
    assert lastword_samples([text]) == [
        {"context": "The mouse sat on the mat near the door. Later the dog came and sat on the", "target": "mouse"},
        {"context": "The mouse sat on the mat near the door. Later the dog came and sat on the mouse.\nA bird flew over "
                    "the house and the tree today. Then the bird landed on the", "target": "tree"}]
    other = ("Some unrelated sentence of another topic here. And one more unrelated sentence of that topic here. "
             "A third sentence of the other topic goes here. A fourth and last one of the other topic.")
    rows = continuation_samples([text, other], seed=0)
    first = rows[0]
    assert first["context"] == "The mouse sat on the mat near the door."
    assert first["endings"][first["label"]] == "Later the dog came and sat on the mouse."
    assert len(lastword_samples([text], exclude="Then the bird landed on the tree.")) == 1


# -- at the end of a training run ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_scores_its_final_checkpoint_on_eval_tasks(models, tmp_path, capfd):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from relaxrec_megatron.parallel.local_world import run_world
    from relaxrec_megatron.training.run import train_entry

    g = torch.Generator().manual_seed(0)
    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), dtype=np.int32)
    for _ in range(40):
        doc = torch.randint(3, 5000, (40,), generator=g).tolist() + [2]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "data.idx"))
    (tmp_path / "c.yaml").write_text(f"""
run: {{name: evaltask, output_dir: {tmp_path}/run, seed: 1}}
model: {{source: {models / 'src'}, recursion: {{loops: 2, rank: 4}}, dtype: fp32}}
data: {{blend: [1.0, {tmp_path}/data], split: "90,10,0", seq_length: 16}}
optim: {{global_batch_size: 2, micro_batch_size: 2, train_steps: 2, lr: 1.0e-3, warmup_steps: 1}}
kd: {{enabled: false}}
checkpoint: {{save_every: 100}}
eval: {{every: 0, tasks: [{LASTWORD}], limit: 4}}
logging: {{wandb_mode: disabled}}
""")
    with pytest.raises(RuntimeError, match="eval.tasks: unknown task 'lastwrd'"):
        run_world(train_entry, 1, str(tmp_path / "c.yaml"), ["eval.tasks=[lastwrd]"], timeout=600)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    run_world(train_entry, 1, str(tmp_path / "c.yaml"), [], timeout=600)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    report = json.loads((tmp_path / "run" / "eval" / "tasks-step_00000002.json").read_text())
    assert list(report["models"]) == [str(step)] and report["limit"] == 4
    acc = report["models"][str(step)]["results"][LASTWORD]["acc"]
    assert acc == np.mean([s["metrics"]["acc"] for s in samples(report, str(step), LASTWORD)])
    console = capfd.readouterr()
    line = [l for l in console.out.splitlines() if l.startswith("[eval] relaxrec")]
    assert len(line) == 1 and f"{LASTWORD}/acc {acc:.4f}" in line[0]
    for noise in ("Apex are not installed", "No CUDA runtime", "Setting accelerator to CPU", "BlendedDataset",
                  "torch.distributed is disabled", "argument order of load"):
        assert noise not in console.out + console.err, noise  # spawned workers stay quiet too


# -- early exits ------------------------------------------------------------------------------------

def test_exit_sweep_by_hand():
    from relaxrec_megatron.evaluation.exits import LoopStats, calibrate, exit_loops, sweep

    # 3 loops, 4 tokens; the last loop's greedy tokens are [5, 6, 7, 8]
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.95, 0.7, 0.1, 0.3], [0.0, 0.0, 0.0, 0.0]])
    greedy = torch.tensor([[5, 1, 7, 2], [5, 6, 3, 8], [5, 6, 7, 8]])
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5], [0.25, 1.25, 2.25, 3.25]], dtype=torch.float64)
    stats = LoopStats(nll, greedy, {"maxprob": conf, "margin": conf})
    assert exit_loops(conf, torch.tensor([0.5, 0.65])).tolist() == [[0, 1, 0, 2], [0, 1, 2, 2]]
    row = sweep(stats, "maxprob", [0.5])[0]
    assert row["exit_fractions"] == [0.5, 0.25, 0.25] and row["mean_loops"] == pytest.approx(1.75)
    assert row["agreement"] == 1.0  # token 0 and 2 agree at loop 0, token 1 at loop 1, token 3 is final
    assert row["perplexity"] == pytest.approx(math.exp((1.0 + 1.5 + 3.0 + 3.25) / 4))
    assert sweep(stats, "maxprob", [0.15])[0]["agreement"] == 0.75  # token 1 now leaves at loop 0, where 1 != 6
    chosen = calibrate(stats, "maxprob", 0.99, resolution=100)
    assert chosen["threshold"] == pytest.approx(0.21) and chosen["agreement"] == 1.0


def test_each_loops_exit_is_the_truncated_source(models):
    # full rank with per-layer norms: loop 1 of 2 runs exactly the source's first 2 of 4 layers, and its
    # exit (final norm, LM head) is then the source cut to those 2 layers
    from relaxrec_megatron.evaluation.exits import loop_stats

    ids = torch.randint(0, 1000, (29,), generator=torch.Generator().manual_seed(2))
    full = AutoModelForCausalLM.from_pretrained(models / "full").eval()
    stats = loop_stats(full, [ids], context=12, stride=5, batch_size=2)
    for layers, loop in ((2, 0), (4, 1)):
        source = AutoModelForCausalLM.from_pretrained(models / "src", num_hidden_layers=layers).eval()
        assert (stats.nll[loop] - token_nlls(source, ids, 12, 5)).abs().max() <= 1e-4
    assert (stats.nll[0] - stats.nll[1]).abs().max() > 0.1


def test_eval_exits_calibrates_and_serving_reads_it(models, tmp_path, capsys):
    from relaxrec_megatron.evaluation.exits import stored_threshold

    model = tmp_path / "full"
    shutil.copytree(models / "full", model)
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_topics("heldout")[:3]))
    png = tmp_path / "exits.png"
    report = eval_json(["eval", "exits", str(model), "--data", str(data), "--max-tokens", "400", "--context", "64",
                        "--agreement", "0.9", "--plot", str(png)], tmp_path / "exits.json")
    assert png.stat().st_size > 10_000 and report["tokens"] > 300
    assert len(report["per_loop_perplexity"]) == 2
    stored = json.loads((model / "exit_calibration.json").read_text())
    assert stored["maxprob"] == report["maxprob"] and stored["maxprob"]["agreement"] >= 0.9
    assert stored_threshold(model, "maxprob") == report["maxprob"]["threshold"]
    out = capsys.readouterr().out
    assert "perplexity by loop" in out and "maxprob*" in out
    assert main(["generate", str(model), "Hello", "--exit", "maxprob", "--threshold", "auto",
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert "no exit_calibration.json; run `relaxrec eval exits" in run_error(
        capsys, ["generate", str(models / "full"), "Hi", "--exit", "maxprob", "--threshold", "auto"])
    assert "needs an exit rule" in run_error(capsys, ["generate", str(model), "Hi", "--threshold", "auto"])
    assert "is an original HF model; early exits need a relaxed recursive checkpoint" in run_error(
        capsys, ["eval", "exits", str(models / "src"), "--data", str(data)])


@pytest.mark.slow
def test_lm_evals_own_cli_runs_the_shipped_tasks_from_any_folder(models, tmp_path, capfd, monkeypatch):
    """`lm_eval` itself, from a folder of its own, with the include path `relaxrec eval include-path`
    prints: the same accuracy as `relaxrec eval tasks` on the same model (run outside any git
    repository, without the harness's git probe on the console)."""
    import subprocess
    import sys

    assert main(["eval", "include-path"]) == 0
    include = capfd.readouterr().out.strip()
    model = str(models / "r4")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above the folder either
    ours = eval_json(["eval", "tasks", model, "--tasks", "local", "--limit", "8", "--batch-size", "4"],
                     tmp_path / "ours.json")["models"][model]["results"]
    err = capfd.readouterr().err
    assert "fatal:" not in err
    bars = [piece for piece in re.split(r"[\r\n]", err) if "%|" in piece]
    assert bars and all(piece.startswith("Running loglikelihood requests") for piece in bars), err[-2000:]
    lm_eval = Path(sys.executable).parent / "lm_eval"
    out = subprocess.run([str(lm_eval), "--model", "hf", "--model_args",
                          f"pretrained={model},trust_remote_code=True,dtype=float32", "--tasks",
                          "relaxrec_pydoc_lastword,relaxrec_pydoc_continuation", "--include_path", include,
                          "--limit", "8", "--batch_size", "4", "--device", "cpu", "--output_path", str(cwd / "out")],
                         cwd=cwd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = json.loads(next((cwd / "out").rglob("results_*.json")).read_text())["results"]
    for task in ("relaxrec_pydoc_lastword", "relaxrec_pydoc_continuation"):
        assert theirs[task]["acc,none"] == ours[task]["acc"], task
