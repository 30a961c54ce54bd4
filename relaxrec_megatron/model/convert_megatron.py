"""Relaxed HF checkpoint <-> Megatron dist checkpoint, without building a model (one process).

The dist checkpoint holds the canonical tensors unsharded; megatron's dist_checkpointing
reshards them on load into any TP/PP layout.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..files import atomic_output_dir
from ..hf.checkpoint import CheckpointReader, ShardedWriter, copy_side_files
from ..hf.convert import REPORT_FILE
from ..hf.export import open_relaxed
from ..hf.folder import write_hf_folder_files
from ..parallel.distributed import single_process_group
from .checkpoint import CONFIG_FILE, read_config
from .state_adapter import canonical_getter, fused_name, qkv_members, split_qkv


def relaxed_to_megatron(relaxed: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    reader = open_relaxed(relaxed)
    # file-backed tensors: the save streams them from disk (only fused q/k/v are built in memory)
    get = canonical_getter(reader.get_mapped, reader.config["num_key_value_heads"])
    with atomic_output_dir(output, overwrite) as tmp, single_process_group():
        names = sorted({fused_name(n) for n in reader.names()})
        state = {n: ShardedTensor.from_rank_offsets(n, get(n), replica_id=0) for n in names}
        dist_checkpointing.save(state, str(tmp))
        (tmp / CONFIG_FILE).write_text(json.dumps(reader.config, indent=1))
        copy_side_files(reader.root, tmp)
        if (reader.root / REPORT_FILE).is_file():
            shutil.copy2(reader.root / REPORT_FILE, tmp / REPORT_FILE)
    return Path(output)


def load_plain_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Megatron dist checkpoint, whole. megatron-core's own load_plain_tensors hands
    every field of torch's TensorProperties to torch.empty, and torch 2.15 added one (strides) that
    torch.empty does not take; these templates take the dtype only, on any torch."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    template = {
        name: ShardedTensor.from_rank_offsets(name, torch.empty(m.size, dtype=m.properties.dtype, device="meta"))
        .without_data() for name, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)
    }
    return dist_checkpointing.load(template, str(checkpoint), validate_access_integrity=False)


def megatron_to_relaxed(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    config = read_config(checkpoint)
    groups, heads, hd = config["num_key_value_heads"], config["num_attention_heads"], config["head_dim"]
    with single_process_group():
        tensors = load_plain_tensors(checkpoint)
    relaxed: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        members = qkv_members(name)
        if members is None:
            relaxed[name] = t
        else:
            relaxed.update(zip(members, split_qkv(t, groups, heads * hd, groups * hd)))
    with atomic_output_dir(output, overwrite) as tmp:
        writer = ShardedWriter(tmp)
        by_shard: dict[str, dict[str, torch.Tensor]] = {}
        plan = config["layer_plan"]
        for name, t in relaxed.items():
            m = re.match(r"model\.(layers|relax)\.(\d+)\.", name)
            shard = "globals" if not m else f"layer-{(int(m.group(2)) if m.group(1) == 'layers' else plan[int(m.group(2))][0]):05d}"
            by_shard.setdefault(shard, {})[name] = t
        for shard, part in sorted(by_shard.items()):
            writer.write(f"model-{shard}.safetensors", part)
        writer.finish()
        write_hf_folder_files(tmp, config, Path(checkpoint))
        if (Path(checkpoint) / REPORT_FILE).is_file():
            shutil.copy2(Path(checkpoint) / REPORT_FILE, tmp / REPORT_FILE)
    CheckpointReader(output)  # the result must read back
    return Path(output)
