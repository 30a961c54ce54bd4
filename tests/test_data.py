"""relaxrec data prepare: real text -> megatron-core indexed dataset that reads back exactly."""

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from relaxrec_megatron.cli.main import main
from relaxrec_megatron.data.pydoc_text import pydoc_topics


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from relaxrec_megatron.hf.smollm import smollm_checkpoint

    folder = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(smollm_checkpoint()).save_pretrained(folder)
    return folder


def test_jsonl_round_trip(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    docs = pydoc_topics("heldout")[:6]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert main(["data", "prepare", str(tmp_path / "c.jsonl"), "--tokenizer", str(tokenizer_dir),
                 "--output-prefix", str(tmp_path / "out" / "c"), "--workers", "2", "--quiet"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    ds = IndexedDataset(str(tmp_path / "out" / "c"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):  # document order kept, EOS appended
        assert ds[i].tolist() == tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ds[0].dtype == np.uint16
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.bin", "c.idx"]


def test_txt_folder_and_text_key(tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "in" / "b.txt").write_text("third line\n")
    assert main(["data", "prepare", str(tmp_path / "in"), "--tokenizer", str(tokenizer_dir),
                 "--output-prefix", str(tmp_path / "t"), "--workers", "0", "--quiet"]) == 0
    assert len(IndexedDataset(str(tmp_path / "t"))) == 3


@pytest.mark.parametrize("setup, argv_extra, message", [
    (lambda p: None, ["{p}/missing.jsonl"], "no such file"),
    (lambda p: (p / "x.jsonl").write_text('{"body": "hi"}\n'), ["{p}/x.jsonl"], "no 'text' field"),
    (lambda p: (p / "e.jsonl").write_text(""), ["{p}/e.jsonl"], "no documents"),
    (lambda p: (p / "x.csv").write_text("a"), ["{p}/x.csv"], "unsupported input"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tokenizer_dir, tmp_path, capsys, setup, argv_extra, message):
    setup(tmp_path)
    argv = ["data", "prepare", *[a.format(p=tmp_path) for a in argv_extra], "--tokenizer", str(tokenizer_dir),
            "--output-prefix", str(tmp_path / "o" / "d"), "--workers", "0", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def _corpus_files(folder, docs, files):
    folder.mkdir()
    for f in range(files):
        part = docs[f * len(docs) // files:(f + 1) * len(docs) // files]
        (folder / f"part{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return folder


def _prepare(inputs, tokenizer_dir, prefix, *extra):
    return main(["data", "prepare", *map(str, inputs), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                 str(prefix), "--workers", "0", "--quiet", *extra])


def _bytes(prefix):
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.mark.slow
@pytest.mark.parametrize("files", [1, 4], ids=["by-documents", "by-files"])
def test_three_shards_merge_to_the_one_shot_dataset_byte_for_byte(tokenizer_dir, tmp_path, capsys, files):
    corpus = _corpus_files(tmp_path / "in", pydoc_topics("heldout")[:10], files)
    assert _prepare([corpus], tokenizer_dir, tmp_path / "whole") == 0
    for i in (2, 0, 1):
        assert _prepare([corpus], tokenizer_dir, tmp_path / "sh" / "c", "--shard", f"{i}/3") == 0
    sizes = [len(IndexedDataset(str(tmp_path / "sh" / f"c-0000{i}-of-00003"))) for i in range(3)]
    assert sum(sizes) == 10 and min(sizes) >= 1  # contiguous, every shard has documents
    assert main(["data", "merge", str(tmp_path / "sh" / "c"), "--output-prefix", str(tmp_path / "merged")]) == 0
    assert "merged 3 datasets: 10 documents" in capsys.readouterr().out
    assert _bytes(tmp_path / "merged") == _bytes(tmp_path / "whole")


def test_rerun_skips_finished_shards_and_refuses_foreign_ones(tokenizer_dir, tmp_path, capsys):
    corpus = _corpus_files(tmp_path / "in", pydoc_topics("heldout")[:6], 1)
    prefix = tmp_path / "sh" / "c"
    assert _prepare([corpus], tokenizer_dir, prefix, "--shard", "1/2") == 0  # a killed run finished one shard
    done = tmp_path / "sh" / "c-00001-of-00002.bin"
    stamp = done.stat().st_mtime_ns
    capsys.readouterr()
    for i in (0, 1):  # the rerun of every shard
        assert _prepare([corpus], tokenizer_dir, prefix, "--shard", f"{i}/2") == 0
    out = capsys.readouterr().out
    assert "shard 1/2 already prepared" in out and out.count("skipped") == 1
    assert done.stat().st_mtime_ns == stamp
    other = _corpus_files(tmp_path / "other", pydoc_topics("heldout")[6:9], 1)
    assert _prepare([other], tokenizer_dir, prefix, "--shard", "1/2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists from another preparation" in err[0] and "--overwrite" in err[0]
    assert _prepare([other], tokenizer_dir, prefix, "--shard", "1/2", "--overwrite") == 0
    assert len(IndexedDataset(str(prefix) + "-00001-of-00002")) == 2  # documents 1..2 of the other three


@pytest.mark.parametrize("argv, message", [
    (["merge", "{p}/sh/c", "--output-prefix", "{p}/m"], "shard(s) 1 of 2 not prepared yet"),
    (["merge", "{p}/nothing", "--output-prefix", "{p}/m"], "not found"),
    (["stats", "{p}/sh/c-00000-of-00002", "x=1"], "need --config"),
    (["prepare", "{p}/in", "--tokenizer", "{tok}", "--output-prefix", "{p}/o", "--shard", "3/3"], "0 <= I < N"),
    (["prepare", "{p}/in", "--tokenizer", "{tok}", "--output-prefix", "{p}/o", "--shard", "0/2", "--streaming"],
     "need at least 2 input files"),
])
def test_bad_shard_use_is_one_line(tokenizer_dir, tmp_path, capsys, argv, message):
    corpus = _corpus_files(tmp_path / "in", pydoc_topics("heldout")[:4], 1)
    assert _prepare([corpus], tokenizer_dir, tmp_path / "sh" / "c", "--shard", "0/2") == 0
    capsys.readouterr()
    assert main(["data", *[a.format(p=tmp_path, tok=tokenizer_dir) for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m.bin").exists() and not (tmp_path / "o.bin").exists()


def test_stats_and_the_epochs_a_run_reads(tokenizer_dir, tmp_path, capsys):
    """The train-split tokens behind the epoch count are the ones megatron's GPTDataset builds its epochs from."""
    from relaxrec_megatron.data.indexed import Counts, counts, expand_blend
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.data import TokenizerInfo, build_datasets

    corpus = _corpus_files(tmp_path / "in", pydoc_topics("heldout")[:12], 3)
    for i in range(3):
        assert _prepare([corpus], tokenizer_dir, tmp_path / "sh" / "c", "--shard", f"{i}/3") == 0
    shards = [counts(f"{tmp_path}/sh/c-0000{i}-of-00003") for i in range(3)]
    weights, prefixes = expand_blend([1.0], [str(tmp_path / "sh" / "c")])
    assert prefixes == [s.prefix for s in shards]
    assert weights == pytest.approx([s.tokens / sum(x.tokens for x in shards) for s in shards], rel=1e-12)

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"model: {{source: x}}\ndata: {{blend: [1.0, {shards[0].prefix}], seq_length: 64, "
                        f"split: '80,20,0'}}\noptim: {{global_batch_size: 4, train_steps: 50}}\n"
                        f"run: {{output_dir: {tmp_path / 'run'}}}\n")
    cfg = load_config(cfg_path)
    train, _ = build_datasets(cfg, TokenizerInfo(49152, 0), 200, 4)
    gpt = train.epochs[0]  # one pass over the component: a megatron GPTDataset
    assert Counts.train_tokens(shards[0], "80,20,0") == gpt._get_num_tokens_per_epoch()

    capsys.readouterr()
    assert main(["data", "stats", "--config", str(cfg_path), "optim.train_steps=1"]) == 0
    out = capsys.readouterr().out
    assert f"{shards[0].documents:>12}{shards[0].tokens:>15}" in out and "warning" not in out
    assert main(["data", "stats", "--config", str(cfg_path)]) == 0  # 50 x 4 x 64 tokens: more than one epoch
    out = capsys.readouterr().out
    epochs = 50 * 4 * 64 / gpt._get_num_tokens_per_epoch()
    assert f"{epochs:>10.2f}" in out and f"warning: the run repeats data: {shards[0].prefix} ({epochs:.2f} epochs)" in out


@pytest.mark.slow
def test_slurm_array_job_prepares_one_shard_per_task(tokenizer_dir, tmp_path):
    """slurm/prepare_data.sh as array task 1 of 2 runs it (SLURM_ARRAY_* set, no sbatch here), task 0 in
    this process: the merged shards are the one-shot dataset. (Resubmitted tasks: test_rerun_...)"""
    import os
    import subprocess
    from pathlib import Path

    corpus = _corpus_files(tmp_path / "in", pydoc_topics("heldout")[:6], 2)
    script = Path(__file__).resolve().parents[1] / "slurm" / "prepare_data.sh"
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the script runs `python`
           "TOKENIZER": str(tokenizer_dir), "OUTPUT_PREFIX": str(tmp_path / "sh" / "c"), "WORKERS": "0",
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
    out = subprocess.run(["bash", str(script), str(corpus)], env={**env, "SLURM_ARRAY_TASK_ID": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[data] shard 1/2 on ") and "\n3 documents, " in out.stdout  # the second file
    assert _prepare([corpus], tokenizer_dir, tmp_path / "sh" / "c", "--shard", "0/2") == 0  # task 0, here
    assert _prepare([corpus], tokenizer_dir, tmp_path / "whole") == 0
    assert main(["data", "merge", str(tmp_path / "sh" / "c"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert _bytes(tmp_path / "m") == _bytes(tmp_path / "whole")
    bad = subprocess.run(["bash", str(script), str(corpus)], env={**env, "SLURM_ARRAY_TASK_ID": "1",
                                                                  "SLURM_ARRAY_TASK_MIN": "1"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must start at 0" in bad.stderr
