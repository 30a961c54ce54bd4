"""Everything a run config can get wrong, checked before the hours of work (conversion, data
indices, model build), cheapest first, each as a one-line UserError that names the setting:

1. types, ranges and choices of every key (TrainConfig.validate, when loaded and with the world size);
2. the runtime: FP8 needs CUDA, Transformer Engine and an FP8-capable GPU (checked on every rank:
   each on its own GPU);
3. the parallel layout against the model: TP against heads, query groups, MLP width and vocabulary,
   PP against the unrolled depth, read from the source's config.json (or model.relaxed's), before
   any weight is read;
4. room on disk for a checkpoint (weights and optimizer state) beside the run folder;
5. data.blend: every dataset is there (training.run.check_data, which also warns of repeats).

The torchrun wrapper (parallel.torchrun) runs 1-4 in the launcher process too, so a bad setting
ends a multi-node launch with its one line before any worker starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError
from .config import TrainConfig

OPTIMIZER_BYTES_PER_PARAM = 12  # fp32 master weight and Adam's two fp32 moments


def check_runtime(cfg: TrainConfig) -> None:
    from .precision import check_fp8_runtime

    if cfg.model.fp8:
        check_fp8_runtime(cfg.model.fp8_recipe)


def student(cfg: TrainConfig) -> tuple[dict, object]:
    """The relaxed HF config the run trains and its sizes (training.memory.Model), from model.relaxed's
    config.json or from the source's config.json and model.recursion: no weights read."""
    if not cfg.model.relaxed:
        from .planning import models

        sizes, _, student_hf, _ = models(cfg)
        return student_hf, sizes
    from ..hf.convert import layer_shapes
    from ..model.reference import open_as
    from ..recursion import SharingPlan
    from .memory import Model

    h = open_as(cfg.model.relaxed, "model.relaxed", f"model.relaxed={cfg.model.relaxed}").config()
    ranks = {m: r for m, r in (h.get("lora_ranks") or {}).items() if r > 0}
    plan = SharingPlan(h["num_hidden_layers"], h["num_loops"], h["recursion_strategy"])
    return h, Model(layer_shapes(h["source_config"])[1], plan, ranks, h["share_norms"], h["share_biases"])


def check_layout(cfg: TrainConfig, student_hf: dict) -> None:
    from ..model.settings import ParallelLayout, RelaxedSettings

    p = cfg.parallel
    try:
        RelaxedSettings(student_hf, ParallelLayout(tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel))
    except UserError as e:
        raise UserError(f"parallel: {e}") from None


def checkpoint_bytes(cfg: TrainConfig, sizes) -> int:
    """One checkpoint: the student's weights in model.dtype and its optimizer state."""
    from .memory import DTYPE_BYTES, Layout, params

    return params(sizes, Layout(), 0) * (DTYPE_BYTES[cfg.model.dtype] + OPTIMIZER_BYTES_PER_PARAM)


def check_disk(cfg: TrainConfig, sizes) -> None:
    need = checkpoint_bytes(cfg, sizes)
    folder = Path(cfg.run.output_dir).resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need * 1.1:
        raise UserError(f"run.output_dir={cfg.run.output_dir}: {free / 1e9:.1f} GB free on its disk, and one "
                        f"checkpoint needs about {need / 1e9:.1f} GB (weights and optimizer state); free space "
                        "or choose another run.output_dir")


def check_against_model(cfg: TrainConfig) -> None:
    """Checks 3-4, from the student's config.json (no weights read)."""
    student_hf, sizes = student(cfg)
    check_layout(cfg, student_hf)
    check_disk(cfg, sizes)


def preflight(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Checks 1-4."""
    cfg.validate(world_size)
    check_runtime(cfg)
    check_against_model(cfg)
