"""Megatron dist checkpoints (torch_dist) of the relaxed recursive model.

The checkpoint stores canonical tensors (the relaxed HF checkpoint's names and layouts), each
once: shared layers by shared index, LoRA by unrolled layer. Any TP/PP layout loads it
(megatron's dist_checkpointing reshards), and it converts to and from the HF formats without
building a model. `relaxrec_config.json` beside it records the architecture and the recursion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from .reference import CONFIG_FILE
from .settings import RelaxedSettings
from .state_adapter import local_shard, pieces, set_local_shard

STATE_FILE = "trainer_state.json"  # in a training step_N/, beside model/ (training.checkpoints)
# fields that must agree between a checkpoint and the model that loads it
RECURSION_FIELDS = ("model_type", "num_hidden_layers", "num_shared_layers", "num_loops", "recursion_strategy",
                    "layer_plan", "lora_ranks", "share_norms", "share_biases", "hidden_size", "intermediate_size",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "norm_type",
                    "gated_mlp", "tie_word_embeddings")


def sharded_state_dict(model, settings: RelaxedSettings, with_data: bool = True) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    params = dict(model.named_parameters())
    tp, tp_rank, dp_rank = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                            ps.get_data_parallel_rank())
    out = {}
    for piece in pieces(model, settings):
        data = local_shard(piece, params[piece.param])
        if not with_data:
            data = torch.empty_like(data)
        offsets = [(piece.tp_axis, tp_rank, tp)] if piece.tp_axis is not None else []
        replica = (0 if piece.main_stage else 1, tp_rank if piece.tp_axis is None else 0, dp_rank)
        # replicas on other stages use the same key with a non-zero replica id: stored once
        sharded = ShardedTensor.from_rank_offsets(piece.canon, data, *offsets, replica_id=replica)
        out[f"{piece.canon}@{piece.param}@{piece.part}"] = sharded
    return out


def check_compatible(saved: dict, settings: RelaxedSettings, where: str) -> None:
    for field in RECURSION_FIELDS:
        if saved.get(field) != settings.hf.get(field):
            raise UserError(f"{where} was saved with {field}={saved.get(field)!r} but the model has "
                            f"{field}={settings.hf.get(field)!r}; convert the checkpoint for this recursion setting")


def save(model, settings: RelaxedSettings, folder: str | Path) -> None:
    from megatron.core import dist_checkpointing

    _forked_results_queue()
    folder = Path(folder)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict(model, settings), str(folder))
    if dist.get_rank() == 0:
        (folder / CONFIG_FILE).write_text(json.dumps(settings.hf, indent=1, default=str))
    dist.barrier()


def _forked_results_queue() -> None:
    """megatron's checkpoint writer collects its results through a multiprocessing Manager it starts
    with the spawn method on the first save (filesystem_async.get_write_results_queue); a spawned
    process outlives a rank that is killed. Started with fork, the Manager is one of the rank's
    forked helpers, which die with it (parallel.process.children_die_with_this_process)."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {CONFIG_FILE}; not a relaxrec Megatron checkpoint")
    return json.loads(path.read_text())


def load(model, settings: RelaxedSettings, folder: str | Path) -> None:
    from megatron.core import dist_checkpointing

    check_compatible(read_config(folder), settings, str(folder))
    template = sharded_state_dict(model, settings, with_data=False)
    loaded = dist_checkpointing.load(template, str(folder))
    params = dict(model.named_parameters())
    for piece in pieces(model, settings):
        set_local_shard(piece, params[piece.param], loaded[f"{piece.canon}@{piece.param}@{piece.part}"])
