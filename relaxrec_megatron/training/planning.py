"""`relaxrec plan`: a run config and a GPU count -> per-GPU memory by term, FLOPs per token, time to
the token budget at a stated MFU, and, when it does not fit, the settings that would make it fit."""

from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..hf.convert import layer_shapes, relaxed_config
from ..model.reference import open_as
from ..recursion import RecursionSpec, SharingPlan
from . import memory
from .config import TrainConfig
from .flops import matmul_flops_per_token, train_flops_per_token


def models(cfg: TrainConfig) -> tuple[memory.Model, memory.Model | None, dict, dict | None]:
    """(student, teacher or None) sizes and their relaxed HF configs, from the source's config.json and
    model.recursion (for a run from model.relaxed: the recursion that checkpoint was made with)."""
    if not cfg.model.source:
        raise UserError("relaxrec plan sizes a run from model.source; for a run that starts from model.relaxed, "
                        "pass its source as model.source=... too")
    src = open_as(cfg.model.source, "model.source", f"model.source={cfg.model.source}").config()
    adapter, shapes = layer_shapes(src)
    spec = cfg.model.recursion
    plan = SharingPlan(adapter.num_layers, spec.loops, spec.strategy)
    ranks = spec.ranks(adapter)
    student = memory.Model(shapes, plan, ranks, spec.share_norms, spec.share_biases)
    student_hf = relaxed_config(adapter, plan, spec, ranks, cfg.model.source, None).to_dict()
    if not cfg.kd.enabled:
        return student, None, student_hf, None
    t_spec = RecursionSpec.one_loop()
    t_plan = SharingPlan(adapter.num_layers, 1, t_spec.strategy)
    teacher_hf = relaxed_config(adapter, t_plan, t_spec, {}, cfg.model.source, None).to_dict()
    return student, memory.Model(shapes, t_plan), student_hf, teacher_hf


def stage_memory(cfg: TrainConfig, student: memory.Model, teacher: memory.Model | None, lay: memory.Layout,
                 stage: int) -> dict:
    """Bytes by term on one GPU of pipeline stage `stage`."""
    p, o, dtype = cfg.parallel, cfg.optim, cfg.model.dtype
    b = memory.DTYPE_BYTES[dtype]
    n = memory.params(student, lay, stage)
    micro_batches = o.global_batch_size // (o.micro_batch_size * lay.dp)
    out = {"student weights": b * n, "teacher weights": b * memory.params(teacher, lay, stage) if teacher else 0}
    opt = memory.optimizer_bytes(student, lay, stage, p.zero_stage)
    out["fp32 master weights"] = opt["master"]
    out["Adam moments"] = opt["moments"]
    out["gradients"] = memory.gradient_bytes(n, dtype, lay.dp, p.zero_stage)
    out["activations"] = memory.activation_bytes(student, lay, stage, o.micro_batch_size, cfg.data.seq_length, dtype,
                                                 p.recompute, micro_batches)
    last = stage == lay.pp - 1
    exits = student.plan.num_loops - 1 if cfg.exit.enabled else 0
    out["logits"] = memory.logits_bytes(student.shapes, o.micro_batch_size, cfg.data.seq_length, dtype, lay.tp,
                                        teacher is not None, earlier_exits=exits) if last else 0
    return out


def dp_traffic(cfg: TrainConfig, student: memory.Model, lay: memory.Layout, stage: int) -> dict:
    """Data-parallel gradient traffic of one step on one GPU of `stage` (training.memory.dp_traffic)."""
    p, o = cfg.parallel, cfg.optim
    micro_batches = o.global_batch_size // (o.micro_batch_size * lay.dp)
    return memory.dp_traffic(memory.param_groups(student, lay, stage), cfg.model.dtype, p.grad_reduce_dtype, lay.dp,
                             p.zero_stage, micro_batches)


def plan(cfg: TrainConfig, gpus: int, gpu: str = "h100", mfu: float = 0.4, link_gbps: float = 400.0) -> dict:
    if gpu not in memory.GPUS:
        raise UserError(f"--gpu {gpu}: choose one of {', '.join(memory.GPUS)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    cfg.validate(gpus)
    p = cfg.parallel
    student, teacher, student_hf, teacher_hf = models(cfg)
    from ..model.settings import ParallelLayout, RelaxedSettings

    RelaxedSettings(student_hf, ParallelLayout(tp=p.tp, pp=p.pp))  # TP/PP fit the shapes, or a one-line error
    lay = memory.Layout(p.tp, p.pp, gpus // (p.tp * p.pp), p.sequence_parallel)
    stages = [stage_memory(cfg, student, teacher, lay, s) for s in range(p.pp)]
    worst = max(range(p.pp), key=lambda s: sum(stages[s].values()))
    flops = train_flops_per_token(student_hf, teacher_hf, cfg.data.seq_length)
    if p.recompute:
        flops += matmul_flops_per_token(student_hf, cfg.data.seq_length)
    g = memory.GPUS[gpu]
    seconds = cfg.tokens() * flops / (gpus * g.peak_bf16 * mfu)
    step_seconds = cfg.optim.global_batch_size * cfg.data.seq_length * flops / (gpus * g.peak_bf16 * mfu)
    traffic = max((dp_traffic(cfg, student, lay, s) for s in range(p.pp)), key=lambda t: t["wire"])
    link_bytes_per_s = link_gbps * 1e9 / 8
    traffic["seconds"], traffic["overlapped_seconds"] = traffic["wire"] / link_bytes_per_s, traffic["overlapped"] / link_bytes_per_s
    total = sum(stages[worst].values())
    return {"gpus": gpus, "gpu": g, "layout": lay, "stages": stages, "worst_stage": worst, "total": total,
            "fits": total <= memory.USABLE * g.memory_gb * 1e9, "flops_per_token": flops, "tokens": cfg.tokens(),
            "mfu": mfu, "seconds": seconds, "step_seconds": step_seconds, "dp_traffic": traffic,
            "link_gbps": link_gbps, "student_params": memory.params(student, memory.Layout(), 0)}


def _with(cfg: TrainConfig, section: str, **changes) -> TrainConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def suggestions(cfg: TrainConfig, gpus: int, gpu: str, mfu: float) -> list[tuple[str, float]]:
    """Single changes that make a run fit, with their per-GPU total: recompute, a smaller micro-batch,
    ZeRO-2, TP 2/4/8 (with SP)."""
    p, o = cfg.parallel, cfg.optim
    tries = []
    if not p.recompute:
        tries.append(("parallel.recompute=true", _with(cfg, "parallel", recompute=True)))
    mb = o.micro_batch_size // 2
    while mb >= 1:
        tries.append((f"optim.micro_batch_size={mb}", _with(cfg, "optim", micro_batch_size=mb)))
        mb //= 2
    if p.zero_stage < 2 and p.tp == 1 and p.pp == 1:
        tries.append(("parallel.zero_stage=2", _with(cfg, "parallel", zero_stage=2)))
    for tp in (2, 4, 8):
        if tp > p.tp and gpus % (tp * p.pp) == 0:
            tries.append((f"parallel.tp={tp} parallel.sequence_parallel=true" + (" parallel.zero_stage=1" if p.zero_stage > 1 else ""),
                          _with(cfg, "parallel", tp=tp, sequence_parallel=True, zero_stage=min(p.zero_stage, 1))))
    out = []
    for label, changed in tries:
        try:
            got = plan(changed, gpus, gpu, mfu)
        except UserError:
            continue
        if got["fits"]:
            out.append((label, got["total"]))
    return out
