"""The uptraining loop: megatron-core pipeline schedules for forward/backward, DeepSpeed ZeRO for the
optimizer state, distillation from the frozen source model, atomic resumable checkpoints.

One step: this rank's micro-batches of the global batch, on the model's device -> schedule (the
loss is the mean over the micro-batch tokens) -> gradient contracts of the recursive model
(parallel.grads) -> one all-reduce over the world of the losses, a non-finite flag and a stop flag,
so every rank skips, stops and reports alike, with one host sync -> DeepSpeed step (ZeRO reduces
over DP and updates its shard; it is run with managed_gradient_accumulation=false, so step() is
the accumulation boundary of the external backward).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from .config import TrainConfig, lr_at

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MegatronMpu:
    """The model-parallel unit DeepSpeed asks for (TP x PP as "model parallel"), from megatron's parallel_state."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.ps.get_model_parallel_group())

    def get_model_parallel_rank(self):
        return dist.get_rank(self.ps.get_model_parallel_group())

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    # No get_tensor_model_parallel_* on purpose: DeepSpeed then counts a parameter in its global
    # gradient norm by the model-parallel (TP x PP) rank, which `mark_unique_for_norms` sets per copy.


def deepspeed_config(cfg: TrainConfig, micro_batches: int, dp: int) -> dict:
    low_precision = cfg.model.dtype in ("bf16", "fp16")
    return {
        "train_batch_size": cfg.optim.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "overlap_comm": False},
        # bf16 + ZeRO-1 + fp32 accumulation is DeepSpeed's BF16_Optimizer: immediate_grad_update moves
        # each gradient into its fp32 buffer as autograd produces it, whichever schedule runs backward
        "bf16": {"enabled": cfg.model.dtype == "bf16", "immediate_grad_update": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16"},
        # micro-batch gradients summed in fp32 next to the fp32 master weights, not in bf16
        **({"data_types": {"grad_accum_dtype": "fp32"}} if low_precision else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class StopSignals:
    """SIGTERM and SIGUSR1 (slurm's preemption notice, which the launchers forward): noted when they
    arrive, acted on at the end of the step by every rank together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg: TrainConfig, student_dir: str | Path, teacher_dir: str | Path | None,
                 signals: StopSignals | None = None):
        self.cfg = cfg
        self.student_dir, self.teacher_dir = Path(student_dir), teacher_dir and Path(teacher_dir)
        self.signals = signals or StopSignals()
        self.stop_requested = False  # agreed by every rank at the end of a step
        self.step = 0
        self.consumed = 0
        self.nonfinite_in_a_row = 0
        self.skipped = 0
        self.history: list[dict] = []

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, train_dataset, valid_dataset=None) -> None:
        import deepspeed
        from megatron.core import parallel_state as ps

        from ..hf.checkpoint import CheckpointReader
        from ..model.settings import ParallelLayout, RelaxedSettings
        from ..model.state_adapter import load_canonical
        from ..parallel.distributed import build_model
        from ..parallel.grads import mark_unique_for_norms, shared_layer_groups
        from ..parallel.distributed import local_device
        from .objective import Objective

        cfg, p = self.cfg, self.cfg.parallel
        self.device = local_device()
        dtype = DTYPES[cfg.model.dtype]
        layout = ParallelLayout(tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel, recompute=p.recompute)
        from .precision import check_fp8_runtime, fp8_settings

        if cfg.model.fp8:
            check_fp8_runtime(cfg.model.fp8_recipe)
        reader = CheckpointReader(self.student_dir)
        self.settings = RelaxedSettings(reader.config, layout)
        student = build_model(self.settings, dtype, fp8=fp8_settings(cfg.model))
        load_canonical(student, self.settings, reader.get)
        self.student = student
        self.groups = shared_layer_groups(self.settings)
        mark_unique_for_norms(student, self.settings)
        teacher = None
        if cfg.kd.enabled:
            t_reader = CheckpointReader(self.teacher_dir)
            t_settings = RelaxedSettings(t_reader.config, layout)
            teacher = build_model(t_settings, dtype)  # the reference stays in model.dtype, also under FP8
            load_canonical(teacher, t_settings, t_reader.get)
        self.model = Objective(student, teacher, cfg.kd, cfg.exit)
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.micro = cfg.optim.global_batch_size // (cfg.optim.micro_batch_size * self.dp)
        o = cfg.optim
        decay, no_decay = [], []
        for name, prm in student.named_parameters():
            (no_decay if prm.dim() < 2 or "norm" in name else decay).append(prm)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        chatter = io.StringIO()  # BF16_Optimizer prints memory reports while it builds; shown only on failure
        try:
            with contextlib.redirect_stdout(chatter):
                self.engine, self.optimizer, _, _ = deepspeed.initialize(
                    model=student, optimizer=optimizer, config=deepspeed_config(cfg, self.micro, self.dp),
                    mpu=MegatronMpu(), dist_init_required=False)
        except Exception:
            print(chatter.getvalue(), end="", flush=True)
            raise
        self.train_dataset, self.valid_dataset = train_dataset, valid_dataset
        from .flops import peak_flops, train_flops_per_token

        teacher_cfg = CheckpointReader(self.teacher_dir).config if cfg.kd.enabled else None
        self.flops_per_token = train_flops_per_token(reader.config, teacher_cfg, cfg.data.seq_length)
        self.peak = peak_flops()

    # -- one step -------------------------------------------------------------------------------
    def loss_step(self, batches: list[dict], forward_only: bool = False) -> torch.Tensor:
        """Runs the schedule; returns this rank's share of (loss, lm_loss, kd_loss[, each loop's exit
        loss]) as a device tensor: the means over its micro-batches on the last stage's TP rank 0,
        zeros on every other rank, so their sum over the world divided by DP is the step's mean."""
        from megatron.core import parallel_state as ps

        from .step import forward_backward

        if self.cfg.model.fp8:
            self.student.set_is_first_microbatch()  # TE recasts the updated weights to FP8 once per step
        stored = forward_backward(self.model, batches, self.cfg.parallel.pp, forward_only,
                                  backward=self.engine.backward)  # it scales by 1 / micro-batches, like the schedule
        loops = self.settings.plan.num_loops if self.cfg.exit.enabled else 0
        share = torch.zeros(3 + loops, dtype=torch.float64, device=self.device)
        if stored and ps.get_tensor_model_parallel_rank() == 0:
            mean = lambda key: torch.stack([r.get(key, r["loss"]) for r in stored]).double().mean(0)
            share[0], share[1] = mean("loss"), mean("lm_loss")
            if self.cfg.kd.enabled:
                share[2] = mean("kd_loss")
            if loops:
                share[3:] = mean("loops")
        return share

    def _nonfinite(self) -> torch.Tensor:
        """1.0 where any of this rank's gradients is not finite (ZeRO-2 keeps them in DeepSpeed's
        partitions, bf16 ZeRO-1 in its fp32 buffers, others in .grad), on the device: no host sync."""
        from ..parallel.grads import accumulated_grad

        if self.cfg.parallel.zero_stage >= 2:
            groups = (getattr(self.optimizer, "averaged_gradients", None) or {}).values()
            tensors = [t for group in groups if group for t in group if t is not None]
        else:
            tensors = [g for g in map(accumulated_grad, self.student.parameters()) if g is not None]
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        return (~finite).to(device=self.device, dtype=torch.float64)

    def _agree(self, share: torch.Tensor, nonfinite: torch.Tensor | None = None) -> dict:
        """The one collective and host sync of a step: sums over the world of the loss shares, the
        non-finite flags and the stop flags, so every rank reports, skips and stops alike."""
        flags = torch.stack([torch.zeros((), dtype=torch.float64, device=self.device) if nonfinite is None
                             else nonfinite.to(self.device, torch.float64),
                             torch.tensor(float(self.signals.received is not None), dtype=torch.float64,
                                          device=self.device)])
        values = torch.cat([share, flags])
        dist.all_reduce(values)
        (loss, lm, kd, *loops), (bad, stop) = values[:-2].tolist(), values[-2:].tolist()
        return {"loss": loss / self.dp, "lm_loss": lm / self.dp, "kd_loss": kd / self.dp,
                **{f"loop{b + 1}_loss": v / self.dp for b, v in enumerate(loops)},
                "finite": bad == 0 and math.isfinite(loss), "stop": stop > 0}

    def eval_losses(self, batches: list[dict]) -> dict:
        """Mean LM loss of one global batch (and with exits, each loop's), no gradients."""
        agreed = self._agree(self.loss_step(batches, forward_only=True))
        return {k: v for k, v in agreed.items() if k == "lm_loss" or k.startswith("loop")}

    def train_step(self) -> dict:
        from ..parallel.grads import finalize_grads
        from .data import micro_batches

        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        batches = micro_batches(self.train_dataset, self.consumed, cfg.optim.global_batch_size,
                                cfg.optim.micro_batch_size, self.dp_rank, self.dp, self.device)
        t0 = time.perf_counter()
        share = self.loss_step(batches)
        finalize_grads(self.student, self.settings, self.groups)
        agreed = self._agree(share, self._nonfinite())
        finite, loss = agreed["finite"], agreed["loss"]
        parts = {k: v for k, v in agreed.items() if k.endswith("_loss") and k != "loss"}
        if agreed["stop"]:
            self.stop_requested = True
        grad_norm = float("nan")
        if finite:
            self.engine.step()
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)  # DeepSpeed's, before clipping
            self.nonfinite_in_a_row = 0
        else:  # skip the update, keep the data position moving
            self.engine.zero_grad() if hasattr(self.engine, "zero_grad") else self.student.zero_grad()
            self.optimizer.zero_grad()
            self.skipped += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= cfg.optim.max_nonfinite_in_a_row:
                raise UserError(f"{self.nonfinite_in_a_row} non-finite steps in a row at step {self.step}; "
                                "lower optim.lr or check the data")
        for prm in self.student.parameters():
            prm.grad = None
        self.step += 1
        self.consumed += cfg.optim.global_batch_size
        seconds = time.perf_counter() - t0
        tokens = cfg.optim.global_batch_size * cfg.data.seq_length
        rec = {"step": self.step, "loss": loss, **parts, "lr": lr, "grad_norm": grad_norm, "skipped": self.skipped,
               "tokens_per_s": tokens / seconds, "seconds": seconds, "finite": finite,
               "optimizer_state_bytes": self.optimizer_state_bytes()}
        if torch.cuda.is_available():
            tflops = self.flops_per_token * tokens / seconds / dist.get_world_size() / 1e12
            rec.update(tflops_per_gpu=tflops, memory_gb=torch.cuda.max_memory_allocated() / 1e9)
            if self.peak is not None:
                rec["mfu"] = tflops * 1e12 / self.peak
        self.history.append(rec)
        return rec

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (Adam moments; ZeRO shards them over DP)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, root: str | Path) -> Path:
        """step_{N}/ (model dist checkpoint, DeepSpeed optimizer shards, trainer state); `latest` is written
        after every rank finished, so a crash mid-save leaves the previous checkpoint the latest."""
        from ..hf.checkpoint import copy_side_files
        from ..model import checkpoint as mckpt

        root = Path(root)
        folder = root / f"step_{self.step:08d}"
        if dist.get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()
        mckpt.save(self.student, self.settings, folder / "model")
        if dist.get_rank() == 0:  # the tokenizer travels with the checkpoint into its HF exports
            copy_side_files(self.student_dir, folder / "model", same_weights=False)
        self.engine.save_checkpoint(str(folder / "optimizer"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)
        state = {"step": self.step, "consumed": self.consumed, "skipped": self.skipped,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row, "config": asdict(self.cfg)}
        torch.save(rng_state(), folder / f"rng_rank{dist.get_rank()}.pt")
        dist.barrier()
        if dist.get_rank() == 0:
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            tmp = root / "latest.tmp"
            tmp.write_text(folder.name)
            os.replace(tmp, root / "latest")
            kept = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in kept[: max(0, len(kept) - self.cfg.checkpoint.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return folder

    def load(self, folder: str | Path) -> None:
        from ..model import checkpoint as mckpt

        folder = Path(folder)
        mckpt.load(self.student, self.settings, folder / "model")
        self.engine.load_checkpoint(str(folder / "optimizer"), tag="state", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        # DeepSpeed restores the module weights it saved; the dist checkpoint is the source of truth
        mckpt.load(self.student, self.settings, folder / "model")
        state = json.loads((folder / "trainer_state.json").read_text())
        self.step, self.consumed = state["step"], state["consumed"]
        self.skipped, self.nonfinite_in_a_row = state["skipped"], state["nonfinite_in_a_row"]
        set_rng_state(torch.load(folder / f"rng_rank{dist.get_rank()}.pt", weights_only=True))


def rng_state() -> dict:
    """This rank's random state: CPU, its CUDA device, and megatron's model-parallel tracker (the
    per-TP-rank streams of dropout and initialisation). Tensors only, so loading runs no pickled code."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def latest_checkpoint(root: str | Path) -> Path | None:
    marker = Path(root) / "latest"
    if not marker.is_file():
        return None
    folder = Path(root) / marker.read_text().strip()
    return folder if (folder / "trainer_state.json").is_file() else None
