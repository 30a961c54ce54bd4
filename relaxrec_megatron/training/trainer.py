"""The uptraining loop: megatron-core pipeline schedules for forward/backward, DeepSpeed ZeRO for the
optimizer state, distillation from the frozen source model. Trainer.train runs the steps, evaluations
(training.validator), logging (training.logger), checkpoints (training.checkpoints) and the stop;
training.run sets a run up around it.

One step: this rank's micro-batches of the global batch, on the model's device -> schedule (the
loss is the mean over the micro-batch tokens) -> gradient contracts of the recursive model
(training.grads, a list built at setup) -> one all-reduce over the world of the losses, a
non-finite flag and a stop flag, so every rank skips, stops and reports alike, with one host sync ->
DeepSpeed step (ZeRO reduces over DP and updates its shard; it is run with
managed_gradient_accumulation=false, so step() is the accumulation boundary of the external backward;
ZeRO-1 reduces there, ZeRO-2 during each micro-batch's backward, in parallel.grad_reduce_dtype).

Host syncs of a step: that one, and DeepSpeed's own: it checks that the gradient norm is finite
(runtime.utils.is_invalid_grad_norm) and, in BF16_Optimizer, compares the clip coefficient with 1
(clip_tensors_by_global_norm). The gradient norm is handed to the logger as a device tensor, which
reads a logging interval's records at once (training.logger.Logger); the KD and cross-entropy losses
index without boolean masks (training.kd). tests/test_training.py counts them.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import UserError
from ..parallel import cpu_mode
from .config import TrainConfig, lr_at, plain
from .memory import REDUCE_BUCKET
from .objective import LossParts
from .stops import StopSignals

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
        # ZeRO-1 all-reduces the accumulated gradients once, at step(); ZeRO-2 reduces each
        # micro-batch's gradients in buckets during its backward, overlapped with the rest of it
        # (DeepSpeed allows overlap only there when the trainer owns the accumulation boundary)
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "overlap_comm": cfg.parallel.zero_stage == 2,
                              "reduce_bucket_size": REDUCE_BUCKET},
        "communication_data_type": "fp32" if cfg.parallel.grad_reduce_dtype == "fp32" else cfg.model.dtype,
        # bf16 + ZeRO-1 + fp32 accumulation is DeepSpeed's BF16_Optimizer: immediate_grad_update moves
        # each gradient into its fp32 buffer as autograd produces it, whichever schedule runs backward
        "bf16": {"enabled": cfg.model.dtype == "bf16", "immediate_grad_update": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16"},
        # micro-batch gradients summed in fp32 next to the fp32 master weights, not in bf16
        **({"data_types": {"grad_accum_dtype": "fp32"}} if low_precision else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class Hooks:
    """Where a caller may look into a run, or change it, on every rank (tests use them to poison
    gradients, send signals and crash mid-save; a user to probe a run):
    before_step(trainer): a training step is about to start;
    after_backward(trainer): this step's gradients are in place, the gradient contracts not yet run;
    after_step(trainer, record): the step is done (record: what the console and wandb get);
    after_model_saved(trainer, folder): a checkpoint's model is written, its other parts are not."""
    after_backward: Callable | None = None
    after_step: Callable | None = None
    after_model_saved: Callable | None = None
    before_step: Callable | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, student_dir: str | Path, teacher_dir: str | Path | None,
                 signals: StopSignals | None = None, hooks: Hooks | None = None):
        self.cfg = cfg
        self.student_dir, self.teacher_dir = Path(student_dir), teacher_dir and Path(teacher_dir)
        self.signals = signals or StopSignals()
        self.hooks = hooks or Hooks()
        self.stop_requested = False  # agreed by every rank at the end of a step
        self.step = 0
        self.consumed = 0
        self.nonfinite_in_a_row = 0
        self.skipped = 0
        self.history: list[dict] = []
        self._state_bytes_seen = 0

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, train_dataset) -> None:
        """Models (student, and the teacher for KD), optimizer, DeepSpeed engine, data."""
        from megatron.core import parallel_state as ps

        from ..parallel.distributed import local_device

        self.device = local_device()
        self.build_models()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.micro = self.cfg.optim.global_batch_size // (self.cfg.optim.micro_batch_size * self.dp)
        self.build_engine(self.build_optimizer())
        self.train_dataset = train_dataset

    def build_models(self) -> None:
        """This rank's stage of the student (and of the frozen teacher) from their relaxed HF
        checkpoints, the gradient contracts' groups, and the objective over both."""
        from ..hf.checkpoint import CheckpointReader
        from ..model.build import build_model
        from ..model.settings import ParallelLayout, RelaxedSettings
        from ..model.state_adapter import load_canonical
        from .flops import peak_flops, train_flops_per_token
        from .grads import grad_contracts, mark_unique_for_norms, shared_layer_groups
        from .objective import Objective
        from .precision import fp8_settings

        cfg, p = self.cfg, self.cfg.parallel
        dtype = DTYPES[cfg.model.dtype]
        layout = ParallelLayout(tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel, recompute=p.recompute)
        reader = CheckpointReader(self.student_dir)
        self.settings = RelaxedSettings(reader.config, layout)
        self.exit_loops = self.settings.plan.num_loops if cfg.exit.enabled else 0  # each loop's exit loss, reported
        self.student = build_model(self.settings, dtype, fp8=fp8_settings(cfg.model), init_weights=False,
                                   loop_exits=max(self.exit_loops - 1, 0))
        load_canonical(self.student, self.settings, reader.get)
        self.contracts = grad_contracts(self.student, self.settings, shared_layer_groups(self.settings))
        mark_unique_for_norms(self.student, self.settings)
        teacher, teacher_cfg = None, None
        if cfg.kd.enabled:
            t_reader = CheckpointReader(self.teacher_dir)
            t_settings, teacher_cfg = RelaxedSettings(t_reader.config, layout), t_reader.config
            teacher = build_model(t_settings, dtype, init_weights=False)  # in model.dtype, also under FP8
            load_canonical(teacher, t_settings, t_reader.get)
        self.model = Objective(self.student, teacher, cfg.kd, cfg.exit)
        self.flops_per_token = train_flops_per_token(reader.config, teacher_cfg, cfg.data.seq_length)
        self.peak = peak_flops()

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the student's trainable parameters, no weight decay on norms and biases."""
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, prm in self.student.named_parameters():
            (no_decay if prm.dim() < 2 or "norm" in name else decay).append(prm)
        return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def build_engine(self, optimizer: torch.optim.Optimizer) -> None:
        """DeepSpeed ZeRO around the student and the optimizer, data parallel over megatron's DP group."""
        import deepspeed

        if cpu_mode.enabled():
            cpu_mode.without_deepspeed_shm_comm()
        chatter = io.StringIO()  # BF16_Optimizer prints memory reports while it builds; shown only on failure
        try:
            with contextlib.redirect_stdout(chatter):
                self.engine, self.optimizer, _, _ = deepspeed.initialize(
                    model=self.student, optimizer=optimizer, config=deepspeed_config(self.cfg, self.micro, self.dp),
                    mpu=MegatronMpu(), dist_init_required=False)
        except Exception:
            print(chatter.getvalue(), end="", flush=True)
            raise

    # -- one step -------------------------------------------------------------------------------
    def loss_step(self, batches: list[dict], forward_only: bool = False) -> LossParts:
        """Runs the schedule; returns this rank's share of the step's LossParts (float64 on the device):
        the means over its micro-batches on the last stage's TP rank 0, zeros on every other rank, so
        their sum over the world divided by DP is the step's mean."""
        from megatron.core import parallel_state as ps

        from .step import forward_backward

        if self.cfg.model.fp8:
            self.student.set_is_first_microbatch()  # TE recasts the updated weights to FP8 once per step
        stored = forward_backward(self.model, batches, self.cfg.parallel.pp, forward_only,
                                  backward=self.engine.backward)  # it scales by 1 / micro-batches, like the schedule
        if stored and ps.get_tensor_model_parallel_rank() == 0:
            return LossParts.mean(stored)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return LossParts(zero, zero)  # packed() fills the KD and loop parts with zeros

    def gradients(self) -> list[torch.Tensor]:
        """This step's gradients where the optimizer will read them: ZeRO-2 in DeepSpeed's reduced
        partitions, bf16 ZeRO-1 in its fp32 buffers, others in .grad."""
        from .grads import accumulated_grad

        if self.cfg.parallel.zero_stage >= 2:
            groups = (getattr(self.optimizer, "averaged_gradients", None) or {}).values()
            return [t for group in groups if group for t in group if t is not None]
        return [g for g in map(accumulated_grad, self.student.parameters()) if g is not None]

    def discard_gradients(self) -> None:
        """Drops this step's gradients wherever the optimizer keeps them, as DeepSpeed's own overflow
        path does: ZeRO-2's reduced partitions outlive zero_grad() and would carry a non-finite
        step's gradients into the next one."""
        self.optimizer.zero_grad()
        for held in ("averaged_gradients", "all_grad_tensors"):
            partitions = getattr(self.optimizer, held, None) or {}
            for key in partitions:
                partitions[key] = None

    def _nonfinite(self) -> torch.Tensor:
        """1.0 where any of this rank's gradients is not finite, on the device: no host sync."""
        tensors = self.gradients()
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        return (~finite).to(device=self.device, dtype=torch.float64)

    def _agree(self, share: LossParts, nonfinite: torch.Tensor | None = None) -> dict:
        """The one collective and host sync of a step: sums over the world of the loss shares, the
        non-finite flags and the stop flags, so every rank reports, skips and stops alike."""
        flags = torch.stack([torch.zeros((), dtype=torch.float64, device=self.device) if nonfinite is None
                             else nonfinite.to(self.device, torch.float64),
                             torch.tensor(float(self.signals.received is not None), dtype=torch.float64,
                                          device=self.device)])
        values = torch.cat([share.packed(self.exit_loops), flags])
        dist.all_reduce(values)
        *parts, bad, stop = values.tolist()
        agreed = {k: v / self.dp for k, v in LossParts.unpacked(parts).items()}
        return {**agreed, "finite": bad == 0 and math.isfinite(agreed["loss"]), "stop": stop > 0}

    def agree_stop(self) -> bool:
        """Whether any rank has been sent a stop signal (one all-reduce of a flag), outside a step: after
        setup, after an evaluation or a save; sets stop_requested."""
        flag = torch.tensor(float(self.signals.received is not None), dtype=torch.float64, device=self.device)
        dist.all_reduce(flag)
        self.stop_requested = self.stop_requested or flag.item() > 0
        return self.stop_requested

    def eval_losses(self, batches: list[dict]) -> dict:
        """Mean LM loss of one global batch (and with exits, each loop's), no gradients."""
        agreed = self._agree(self.loss_step(batches, forward_only=True))
        return {k: v for k, v in agreed.items() if k == "lm_loss" or k.startswith("loop")}

    def train_step(self) -> dict:
        from .data import micro_batches
        from .grads import apply_contracts

        cfg = self.cfg
        if self.hooks.before_step is not None:
            self.hooks.before_step(self)
        lr = lr_at(self.step, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        batches = micro_batches(self.train_dataset, self.consumed, cfg.optim.global_batch_size,
                                cfg.optim.micro_batch_size, self.dp_rank, self.dp, self.device)
        t0 = time.perf_counter()
        share = self.loss_step(batches)
        if self.hooks.after_backward is not None:
            self.hooks.after_backward(self)
        apply_contracts(self.contracts)
        agreed = self._agree(share, self._nonfinite())
        finite, loss = agreed["finite"], agreed["loss"]
        parts = {k: v for k, v in agreed.items() if k.endswith("_loss") and k != "loss"}
        if agreed["stop"]:
            self.stop_requested = True
        grad_norm = float("nan")
        if finite:
            self.engine.step()
            # DeepSpeed's, before clipping: a device tensor (a float under fp32 ZeRO-0/1), read by the
            # logger when it writes the record, not here, so the host does not wait for the update
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = 0.0 if grad_norm is None else grad_norm
            self.nonfinite_in_a_row = 0
        else:  # skip the update, keep the data position moving
            self.discard_gradients()
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
               "optimizer_state_bytes": self._state_bytes()}
        if torch.cuda.is_available():
            tflops = self.flops_per_token * tokens / seconds / dist.get_world_size() / 1e12
            rec.update(tflops_per_gpu=tflops, memory_gb=torch.cuda.max_memory_allocated() / 1e9)
            if self.peak is not None:
                rec["mfu"] = tflops * 1e12 / self.peak
        self.history.append(rec)
        if self.hooks.after_step is not None:
            self.hooks.after_step(self, rec)
        return rec

    # -- the loop -------------------------------------------------------------------------------
    def train(self, checkpoints, logger, validator=None) -> list[dict]:
        """Steps until optim.train_steps or an agreed stop: every step's record to the logger, an
        evaluation every eval.every steps (validator), a checkpoint every checkpoint.save_every steps,
        at the end and at a stop. Returns this run's records; a stop leaves stop_requested set and the
        step it stopped at saved. A failing step keeps the records of the steps before it."""
        from tqdm.auto import tqdm

        from ..parallel.distributed import set_collective_timeout
        from .watchdog import StallWatch

        cfg = self.cfg
        watch = StallWatch(cfg.parallel.stall_factor, cfg.parallel.stall_floor_s, cfg.checkpoint.save_timeout_min * 60,
                           cfg.eval.batches)
        bar = tqdm(total=cfg.optim.train_steps, initial=self.step, unit="step", desc="train",
                   disable=dist.get_rank() != 0, dynamic_ncols=True)
        records = []
        step_s, save_s = cfg.parallel.collective_timeout_min * 60, cfg.checkpoint.save_timeout_min * 60
        lowered = False  # the start-up limits hold until the first step is done

        @contextlib.contextmanager
        def phase(what: str, step: int):
            """What the run is doing, for the stall watch's limits, the collectives' and the stop line."""
            nonlocal lowered
            watch.begin(what, step)
            self.signals.phase = f"{'' if what == 'step' else 'the '}{what} {step}"
            saving = what.startswith("save") and lowered
            if saving:  # rank 0 writes the manifest while the others wait in a barrier
                set_collective_timeout(save_s)
            yield
            if saving or not lowered:
                set_collective_timeout(step_s)
                lowered = True
            watch.end()

        try:
            while self.step < cfg.optim.train_steps and not self.stop_requested:
                with phase("step", self.step + 1):
                    rec = self.train_step()
                records.append(rec)
                logger.record(rec)
                bar.update(1)
                done = self.step >= cfg.optim.train_steps
                save = ((done and cfg.checkpoint.save_final) or self.stop_requested
                        or rec["step"] % cfg.checkpoint.save_every == 0)
                if save or rec["step"] % cfg.logging.every == 0:
                    logger.flush(bar)
                evaluated = bool(cfg.eval.every and rec["step"] % cfg.eval.every == 0 and validator is not None
                                 and not self.stop_requested)  # a stop costs the step in flight and the save
                if evaluated:
                    with phase("evaluation at step", self.step):
                        logger.log_eval(validator(self), rec["step"])
                if save:
                    with phase("save of step", self.step):
                        checkpoints.save(self)
                if (save or evaluated) and not done and not self.stop_requested and self.agree_stop():
                    if not save:  # sent during the evaluation; one sent during a save stops with that checkpoint
                        with phase("save of step", self.step):
                            checkpoints.save(self)
        finally:
            watch.close()
            logger.flush()
            bar.close()
        return records

    def _state_bytes(self) -> int:
        """optimizer_state_bytes, walked once: Adam's state exists from the first update on and keeps its size."""
        if not self._state_bytes_seen:
            self._state_bytes_seen = self.optimizer_state_bytes()
        return self._state_bytes_seen

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (Adam moments; ZeRO shards them over DP)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    # -- what a checkpoint keeps besides the weights and the optimizer (training.checkpoints) ---------
    def layout(self) -> dict:
        p = self.cfg.parallel
        return {"tp": p.tp, "pp": p.pp, "dp": self.dp, "zero_stage": p.zero_stage}

    def state(self) -> dict:
        return {"step": self.step, "consumed": self.consumed, "skipped": self.skipped,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "layout": self.layout(), "config": plain(self.cfg)}

    def restore(self, state: dict) -> None:
        self.step, self.consumed = state["step"], state["consumed"]
        self.skipped, self.nonfinite_in_a_row = state["skipped"], state["nonfinite_in_a_row"]
