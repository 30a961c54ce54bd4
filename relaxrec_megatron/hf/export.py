"""Relaxed recursive HF checkpoint -> vanilla checkpoint of the source architecture (W' + BA per layer)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import atomic_output_dir
from .arch import adapter_for
from .checkpoint import CheckpointError, CheckpointReader, ShardedWriter
from .convert import DTYPES
from .folder import write_hf_folder_files
from .layout import GLOBAL_PATHS, is_linear_weight, layer_path, lora_paths


def open_relaxed(path: str | Path) -> CheckpointReader:
    reader = CheckpointReader(path)
    if reader.config.get("model_type") != "relaxed_recursive":
        raise CheckpointError(f"{reader.root}: model_type is {reader.config.get('model_type')!r}, "
                              "not a relaxed recursive checkpoint (make one with `relaxrec convert`)")
    if not reader.config.get("source_config"):
        raise CheckpointError(f"{reader.root}: config.json has no source_config; cannot rebuild the source architecture")
    return reader


def unrolled_layer(reader: CheckpointReader, l: int) -> dict[str, torch.Tensor]:
    """Canonical tensors of unrolled layer l, in fp32: W' + B_l A_l, and the norms/biases it runs with."""
    cfg = reader.config
    adapter = adapter_for(cfg["source_config"])
    k = cfg["layer_plan"][l][0]
    canon = {}
    for name in adapter.layer_tensor_shapes():
        t = reader.get(layer_path(name, k, l, cfg["share_norms"], cfg["share_biases"])).float()
        module = name.split(".")[0]
        if is_linear_weight(name) and cfg["lora_ranks"].get(module, 0) > 0:
            a_path, b_path = lora_paths(l, module)
            t = t + reader.get(b_path).float() @ reader.get(a_path).float()
        canon[name] = t
    return canon


def export_unrolled(relaxed: str | Path, output: str | Path, dtype: str = "auto", overwrite: bool = False,
                    progress: bool = True) -> Path:
    reader = open_relaxed(relaxed)
    cfg = reader.config
    source_cfg = dict(cfg["source_config"])
    adapter = adapter_for(source_cfg)
    if dtype == "auto":
        out_dtype = reader.dtype(GLOBAL_PATHS["embed.weight"])
    elif dtype in DTYPES:
        out_dtype = DTYPES[dtype]
    else:
        raise CheckpointError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    with atomic_output_dir(output, overwrite) as tmp:
        writer = ShardedWriter(tmp)
        writer.write("model-globals.safetensors",
                     {hf: reader.get(GLOBAL_PATHS[c]).to(out_dtype) for c, hf in adapter.global_names().items()})
        for l in tqdm(range(cfg["num_hidden_layers"]), desc="export", unit="layer", disable=not progress):
            hf = adapter.layer_from_canonical(l, unrolled_layer(reader, l))
            writer.write(f"model-layer-{l:05d}.safetensors", {n: t.to(out_dtype) for n, t in hf.items()})
        writer.finish()
        source_cfg["hidden_act"] = cfg["hidden_act"]  # the activation the relaxed model ran (see GemmaAdapter)
        write_hf_folder_files(tmp, source_cfg, reader.root, dtype=str(out_dtype))
    return Path(output)
