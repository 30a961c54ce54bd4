"""`relaxrec generate`: the engine's tokens streamed, prompts from files, and its errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM


def test_generate_cli_streams_the_engines_output(chat_model, capsys):
    from relaxrec_megatron.cli.main import main

    folder, tokenizer = chat_model
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = "The capital of France is"
    ids = tokenizer(prompt).input_ids
    gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, len(ids):]
    if tokenizer.eos_token_id in gen.tolist():
        gen = gen[: gen.tolist().index(tokenizer.eos_token_id) + 1]
    assert main(["generate", str(folder), prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == prompt + "".join(tokenizer.decode([t]) for t in gen.tolist())
    assert "tok/s" in out.err and "loops/token" in out.err


def test_generate_cli_prompts_from_a_file(chat_model, tmp_path, capsys):
    from relaxrec_megatron.cli.main import main

    folder, _ = chat_model
    (tmp_path / "prompts.txt").write_text("Hello there\n\nOnce upon a time\n")
    assert main(["generate", str(folder), "--file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "3",
                 "--exit", "maxprob", "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "--- Hello there" in out and "--- Once upon a time" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "{folder}"], "no prompts"),
    (["generate", "{folder}", "--file", "/nonexistent/p.txt"], "no such file"),
    (["generate", "{src}", "hi"], "the engine serves relaxed recursive checkpoints"),
    (["generate", "{parent}", "hi"], "not a checkpoint; pass an HF folder (config.json), a hub id"),
    (["generate", "{folder}", "hi", "--max-new-tokens", "0"], "must be >= 1"),
    (["generate", "{folder}", "hi", "--max-batch", "0"], "must be >= 1"),
    (["generate", "{folder}", "hi", "--exit", "maxprob", "--threshold", "1.5"], "lies in [0, 1]"),
])
def test_generate_cli_errors(chat_model, capsys, argv, message):
    from relaxrec_megatron.cli.main import main

    folder, _ = chat_model
    argv = [a.format(folder=folder, src=folder.parent / "src", parent=folder.parent) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_generate_takes_a_megatron_checkpoint_as_its_hf_export(chat_model, tmp_path, capsys):
    """The same references as eval and export: a Megatron checkpoint generates what its relaxed HF
    source does, with the tokenizer saved beside it."""
    from relaxrec_megatron.cli.main import main
    from relaxrec_megatron.model.convert_megatron import relaxed_to_megatron

    folder, _ = chat_model
    relaxed_to_megatron(folder, tmp_path / "megatron")
    outs = []
    for ref in (folder, tmp_path / "megatron"):
        assert main(["generate", str(ref), "The capital of France is", "--max-new-tokens", "8"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > len("The capital of France is")
