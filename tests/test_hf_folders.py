"""Every HF folder relaxrec writes is a standard one, as plain transformers reads it (this package
blocked): the materialised SmolLM2 source, a relaxed conversion, its round trip through a Megatron
checkpoint, and the unrolled export. Each has `architectures` naming the class that loads it, the
dtype under both names, generation_config.json with the source's special tokens, the tokenizer and
chat template; transformers' loaders and pipeline("text-generation") take it as it is."""

import json
import subprocess
import sys

import pytest
from tiny import WITHOUT_PACKAGE

from relaxrec_megatron.hf.convert import RecursionSpec, convert_to_relaxed
from relaxrec_megatron.hf.export import export_unrolled
from relaxrec_megatron.hf.smollm import smollm_checkpoint

READ = WITHOUT_PACKAGE + """
import json
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
seen = {}
for folder in sys.argv[1:]:
    cfg = json.load(open(folder + '/config.json'))
    (arch,) = cfg['architectures']
    relaxed = cfg['model_type'] == 'relaxed_recursive'
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # never the folder's own code
    config = AutoConfig.from_pretrained(folder, trust_remote_code=relaxed)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=relaxed).eval()
    text = pipeline('text-generation', model=model, tokenizer=tok)('Hello', max_new_tokens=4, do_sample=False)
    seen[folder] = dict(arch=arch, known=hasattr(transformers, arch), cls=type(model).__name__,
                        dtype=cfg.get('dtype'), torch_dtype=cfg.get('torch_dtype'),
                        generation=json.load(open(folder + '/generation_config.json')),
                        ids={k: cfg.get(k) for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')},
                        chat=bool(tok.chat_template), text=text[0]['generated_text'])
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_every_folder_relaxrec_writes_is_a_standard_hf_folder(chat_model, tmp_path):
    from relaxrec_megatron.model.convert_megatron import megatron_to_relaxed, relaxed_to_megatron

    relaxed, _ = chat_model
    source = relaxed.parent / "src"
    convert_to_relaxed(str(source), tmp_path / "relaxed", RecursionSpec(loops=2, rank=4), progress=False)
    relaxed_to_megatron(tmp_path / "relaxed", tmp_path / "megatron")
    megatron_to_relaxed(tmp_path / "megatron", tmp_path / "round-trip")
    export_unrolled(tmp_path / "relaxed", tmp_path / "unrolled", progress=False)
    export_unrolled(tmp_path / "relaxed", tmp_path / "unrolled-bf16", dtype="bf16", progress=False)
    folders = {"smollm2": smollm_checkpoint(), "relaxed": tmp_path / "relaxed", "round-trip": tmp_path / "round-trip",
               "unrolled": tmp_path / "unrolled", "unrolled-bf16": tmp_path / "unrolled-bf16"}
    out = subprocess.run([sys.executable, "-c", READ, *map(str, folders.values())], capture_output=True, text=True,
                         timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = {name: s for name, s in zip(folders, json.loads(out.stdout.strip().splitlines()[-1]).values())}
    for name, s in seen.items():
        relaxed_folder = name in ("relaxed", "round-trip")
        assert s["arch"] == s["cls"] == ("RelaxedRecursiveForCausalLM" if relaxed_folder else "LlamaForCausalLM"), name
        assert s["known"] is not relaxed_folder, name  # a vanilla folder names a class transformers has
        assert s["dtype"] == s["torch_dtype"] == ("bfloat16" if name == "unrolled-bf16" else "float32"), name
        assert {k: s["generation"].get(k) for k in s["ids"]} == s["ids"], name
        assert s["ids"]["eos_token_id"] is not None and s["chat"], name
        assert s["text"].startswith("Hello") and len(s["text"]) > len("Hello"), name
