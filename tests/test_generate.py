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
    (["generate", "{folder}", "hi", "--max-new-tokens", "0"], "must be >= 1"),
    (["generate", "{folder}", "hi", "--max-batch", "0"], "must be >= 1"),
    (["generate", "{folder}", "hi", "--exit", "maxprob", "--threshold", "1.5"], "lies in [0, 1]"),
])
def test_generate_cli_errors(chat_model, capsys, argv, message):
    from relaxrec_megatron.cli.main import main

    folder, _ = chat_model
    argv = [a.format(folder=folder, src=folder.parent / "src") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
