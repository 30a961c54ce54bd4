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
                 "--output-prefix", str(tmp_path / "t"), "--quiet"]) == 0
    assert len(IndexedDataset(str(tmp_path / "t"))) == 3


@pytest.mark.parametrize("setup, argv_extra, message", [
    (lambda p: None, ["{p}/missing.jsonl"], "no such file"),
    (lambda p: (p / "x.jsonl").write_text('{"body": "hi"}\n'), ["{p}/x.jsonl"], "has no 'text' field"),
    (lambda p: (p / "e.jsonl").write_text(""), ["{p}/e.jsonl"], "no documents"),
    (lambda p: (p / "x.csv").write_text("a"), ["{p}/x.csv"], "unsupported input"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tokenizer_dir, tmp_path, capsys, setup, argv_extra, message):
    setup(tmp_path)
    argv = ["data", "prepare", *[a.format(p=tmp_path) for a in argv_extra], "--tokenizer", str(tokenizer_dir),
            "--output-prefix", str(tmp_path / "o" / "d"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
