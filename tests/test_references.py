"""Every command that takes a model, on every kind of model reference (model.reference): the kinds a
command takes run to the end; the others end with one line, exit 2, that says what the reference is
and what to do with it, and nothing is written. Hub ids are read from an HF cache on disk, offline,
by the real hub code."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import cache_repo, save_token_corpus

from relaxrec_megatron.cli.main import main
from relaxrec_megatron.model.reference import USES, Kind

O, R, M = Kind.ORIGINAL, Kind.RELAXED, Kind.MEGATRON
TEXT = "The quick brown fox jumps over the lazy dog. " * 8
# command -> (argv, the use it opens its model as)
COMMANDS = {
    "convert": (["convert", "{ref}", "{out}", "--rank", "2", "--quiet"], "convert"),
    "convert --to megatron": (["convert", "{ref}", "{out}", "--rank", "2", "--to", "megatron", "--quiet"],
                              "convert --to megatron"),
    "export hf-relaxed": (["export", "hf-relaxed", "{ref}", "{out}", "--quiet"], "export hf-relaxed"),
    "export hf-unrolled": (["export", "hf-unrolled", "{ref}", "{out}", "--quiet"], "export hf-unrolled"),
    "eval ppl": (["eval", "ppl", "{ref}", "--data", "{text}", "--context", "16", "--max-tokens", "32",
                  "--output", "{out}"], "eval"),
    "eval exits": (["eval", "exits", "{ref}", "--data", "{text}", "--context", "16", "--max-tokens", "32",
                    "--no-store", "--output", "{out}"], "eval exits"),
    "generate": (["generate", "{ref}", "Hello", "--max-new-tokens", "2"], "serve"),
    "bench serve": (["bench", "serve", "--model", "{ref}", "--requests", "2", "--prompt-mean", "4", "--gen-mean",
                     "2", "--exit-prob", "-1", "--json", "{out}"], "serve"),
    "train model.source": (["train", "--config", "{config}", "model.source={ref}", "--check"], "model.source"),
    "train model.relaxed": (["train", "--config", "{config}", "model.relaxed={ref}", "--check"], "model.relaxed"),
}
# reference -> its kind (None: not a model at all)
REFS = {"builtin": O, "original": O, "relaxed": R, "dist": M, "step": M, "checkpoints": M, "run": M,
        "not-a-checkpoint": None, "missing": None}
HUB = {"org/tiny-original": O, "org/tiny-relaxed": R}
REFUSED = {  # the start of each refusal's reason, by the kind refused
    O: "is an original HF model; ", R: "is a relaxed recursive HF checkpoint (of ", M: "is a Megatron checkpoint (of "}


@pytest.fixture(scope="module")
def refs(chat_model, tmp_path_factory):
    """Each kind of reference to one tiny Llama with SmolLM2's tokenizer, a run config and a text."""
    from relaxrec_megatron.model.steps import LATEST_FILE, write_manifest

    relaxed, _ = chat_model
    root = tmp_path_factory.mktemp("refs")
    assert main(["convert", str(relaxed), str(root / "dist"), "--to", "megatron", "--quiet"]) == 0
    step = root / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(root / "dist", step / "model")
    write_manifest(step)
    (step.parent / LATEST_FILE).write_text(step.name)
    (root / "run" / "init" / "other").mkdir(parents=True)
    (root / "run" / "init" / "other" / "notes.txt").write_text("not a model")
    (root / "text.txt").write_text(TEXT)
    save_token_corpus(root / "data", vocab=500)
    (root / "c.yaml").write_text(f"""
run: {{name: refs, output_dir: {root}/train-run, seed: 1}}
model: {{source: {relaxed.parent / 'src'}, recursion: {{loops: 2, rank: 2}}, dtype: fp32}}
data: {{blend: [1.0, {root}/data], split: "90,10,0", seq_length: 16}}
optim: {{global_batch_size: 2, micro_batch_size: 1, train_steps: 2, lr: 1.0e-3, warmup_steps: 1}}
kd: {{enabled: true}}
""")
    paths = {"builtin": "builtin:smollm2-135m", "original": relaxed.parent / "src", "relaxed": relaxed,
             "dist": root / "dist", "step": step, "checkpoints": step.parent, "run": root / "run",
             "not-a-checkpoint": root / "run" / "init" / "other", "missing": root / "missing" / "x"}
    return root, {k: str(v) for k, v in paths.items()}


def argv(command: str, ref: str, out: Path, root: Path) -> list[str]:
    return [a.format(ref=ref, out=out, text=root / "text.txt", config=root / "c.yaml") for a in COMMANDS[command][0]]


def check_refusal(command: str, kind, ref: str, rc: int, err: list[str]) -> None:
    """Exit 2 and one line, saying what `ref` is and what to do with it."""
    assert rc == 2 and len(err) == 1, (rc, err)
    if kind is None:
        assert f"{ref}: not a checkpoint; pass an HF folder" in err[0] or f"{ref}: no such folder; pass" in err[0]
        return
    assert f"{ref} {REFUSED[kind]}" in err[0], err[0]
    assert "relaxrec " in err[0] or "model." in err[0], err[0]  # what to run or set instead


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_its_kinds_of_reference_and_refuses_the_others_in_one_line(refs, command, tmp_path,
                                                                                       capfd):
    root, paths = refs
    takes = USES[COMMANDS[command][1]]
    for name, kind in REFS.items():
        out = tmp_path / name / "out"
        out.parent.mkdir()
        capfd.readouterr()
        rc = main(argv(command, paths[name], out, root))
        err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("relaxrec ")]
        if kind in takes:
            assert rc == 0, (name, err)
        else:
            check_refusal(command, kind, paths[name], rc, err)
            assert list(out.parent.iterdir()) == [], name  # nothing written
    assert (root / "dist").is_dir() and not (root / "train-run").exists()  # --check writes nothing


HUB_RUN = """
import contextlib, io, json, sys
from relaxrec_megatron.cli.main import main
results = {}
for key, args in json.loads(sys.argv[1]).items():
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(args)
    results[key] = [rc, [line for line in err.getvalue().splitlines() if line.startswith('relaxrec ')]]
print(json.dumps(results), flush=True)
"""


@pytest.mark.slow
def test_hub_ids_are_opened_by_the_hub_code_from_its_cache(refs, tmp_path):
    """Every command on a hub id of an original and of a relaxed model, fetched by huggingface_hub
    from its cache with the hub offline; an id the cache lacks is one line."""
    import os

    root, paths = refs
    cache = tmp_path / "hub"
    cache_repo(cache, "org/tiny-original", Path(paths["original"]))
    cache_repo(cache, "org/tiny-relaxed", Path(paths["relaxed"]))
    cells = {f"{command}|{repo}": argv(command, repo, tmp_path / "out" / f"{i}-{j}", root)
             for i, command in enumerate(COMMANDS) for j, repo in enumerate([*HUB, "org/absent"])}
    (tmp_path / "out").mkdir()
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", HUB_RUN, json.dumps(cells)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for cell, (rc, err) in json.loads(done.stdout.strip().splitlines()[-1]).items():
        command, repo = cell.split("|")
        kind = HUB.get(repo)
        if repo == "org/absent":
            assert rc == 2 and len(err) == 1 and "cannot fetch 'org/absent' from the hub" in err[0], (cell, err)
        elif kind in USES[COMMANDS[command][1]]:
            assert rc == 0, (cell, err)
        else:
            check_refusal(command, kind, repo, rc, err)


@pytest.mark.slow
def test_the_builtin_model_is_made_when_first_used_with_the_projects_lines_only(tmp_path, monkeypatch, capfd):
    """A command that refuses builtin:smollm2-135m does so without making its HF folder; the first
    command that uses it makes it once, with no third-party bar or notice on the console."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RELAXREC_CACHE", str(cache))
    assert main(["generate", "builtin:smollm2-135m", "Hello"]) == 2
    assert not cache.exists()
    capfd.readouterr()
    assert main(["eval", "ppl", "builtin:smollm2-135m", "--data", str(tmp_path / "t.txt"), "--context", "16",
                 "--max-tokens", "32", "--output", str(tmp_path / "ppl.json")]) == 2  # no such file
    assert not cache.exists()
    (tmp_path / "t.txt").write_text(TEXT)
    capfd.readouterr()
    assert main(["eval", "ppl", "builtin:smollm2-135m", "--data", str(tmp_path / "t.txt"), "--context", "16",
                 "--max-tokens", "32", "--output", str(tmp_path / "ppl.json")]) == 0
    console = capfd.readouterr()
    assert (cache / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    bars = [piece for piece in re.split(r"[\r\n]", console.err) if piece.strip()]
    assert bars and all(piece.startswith("ppl:") for piece in bars), console.err[-2000:]  # the project's bar only
    assert all(line.startswith(("[eval]", "model", "builtin")) or not line.strip() for line in console.out.splitlines()), \
        console.out
