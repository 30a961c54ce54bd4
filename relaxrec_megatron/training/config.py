"""Run configuration: YAML -> nested dataclasses, with dotted `key=value` overrides from the CLI."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..recursion.spec import RecursionSpec, choice


@dataclass
class RunConfig:
    name: str = "relaxrec"
    output_dir: str = "runs/relaxrec"
    seed: int = 1234


@dataclass
class ModelConfig:
    source: str = ""  # HF checkpoint (hub id or folder): conversion input and KD teacher
    relaxed: str | None = None  # start from this relaxed HF checkpoint instead of converting
    recursion: RecursionSpec = field(default_factory=lambda: RecursionSpec(rank=512))
    dtype: str = "bf16"  # bf16 on GPUs; fp32 on CPU
    # FP8 GEMMs in the decoder layers (Transformer Engine, Hopper or newer); embedding, LM head and the
    # teacher stay in model.dtype. The shared layers run once per loop, so the recipe must scale from
    # the tensor at hand: tensorwise (current scaling), blockwise or mxfp8; delayed is refused.
    fp8: bool = False
    fp8_format: str = "hybrid"  # hybrid (E4M3 forward, E5M2 gradients) | e4m3
    fp8_recipe: str = "tensorwise"
    fp8_first_last_bf16: bool = False  # keep the first and last unrolled layers in model.dtype
    # minutes the other ranks wait while rank 0 converts the source (an SVD per matrix and layer);
    # `relaxrec convert` beforehand plus model.relaxed skips the wait
    convert_timeout_min: float = 240.0


FP8_RECIPES = ("tensorwise", "blockwise", "mxfp8")
WANDB_MODES = ("auto", "online", "offline", "disabled")
GRAD_REDUCE_DTYPES = ("model", "fp32")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    recompute: bool = False
    zero_stage: int = 1  # DeepSpeed ZeRO: 1 with PP; 1 or 2 without
    # dtype of the data-parallel gradient reduction: "model" (bf16 runs send half the bytes of fp32,
    # DeepSpeed's default) or "fp32" (the fp32 accumulations are summed without rounding to bf16)
    grad_reduce_dtype: str = "model"
    # a stalled rank (training.watchdog): after the first steps, a step that runs longer than
    # stall_factor x the slowest step so far, and at least stall_floor_s, ends the run naming the
    # ranks it waits for (torchrun then restarts it from the last checkpoint, MAX_RESTARTS)
    stall_factor: float = 10.0
    stall_floor_s: float = 120.0
    # once the first step is done, a collective of a step or an evaluation gives up after this (NCCL
    # then ends the rank, and torchrun restarts the run from its last checkpoint); saves wait up to
    # checkpoint.save_timeout_min, and start-up phases have limits of their own
    collective_timeout_min: float = 5.0


@dataclass
class DataConfig:
    blend: list = field(default_factory=list)  # [weight, prefix, weight, prefix, ...] of indexed datasets
    split: str = "99,1,0"
    seq_length: int = 2048
    tokenizer: str | None = None  # default: model.source
    build_timeout_min: float = 120.0  # rank 0 checks the blend and builds the sample indices, the others wait


@dataclass
class OptimConfig:
    global_batch_size: int = 1024
    micro_batch_size: int = 4
    train_steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.1  # wsd: last fraction of steps that decays
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0
    max_nonfinite_in_a_row: int = 10


@dataclass
class KDConfig:
    enabled: bool = True
    alpha: float = 0.5  # weight of the CE term; 1 - alpha on KL(teacher || student)
    temperature: float = 1.0


@dataclass
class ExitConfig:
    """Early-exit training: each loop's exit is the shared final norm and LM head applied to the hidden
    state at the end of that loop; the loss is the weighted sum of the loops' exit losses."""

    enabled: bool = False
    # one weight per loop, the first loop first; empty: 0.1 on every earlier loop and 1.0 on the last,
    # the paper's "aggressive coefficient" as far as it is published (its exact values are not)
    weights: list = field(default_factory=list)
    # what an earlier exit also learns, beside the labels: the detached final-loop distribution
    # ("final"), the KD teacher's ("teacher", needs kd.enabled), or nothing ("none": CE alone)
    distill: str = "final"
    alpha: float = 0.5  # weight of the CE term in an earlier exit's loss when it distills; 1 - alpha on KL
    temperature: float = 1.0

    def loop_weights(self, loops: int) -> list[float]:
        if not self.weights:
            return [0.1] * (loops - 1) + [1.0]
        if len(self.weights) != loops:
            raise UserError(f"exit.weights has {len(self.weights)} entries for a model with {loops} loops; "
                            f"give one per loop, e.g. exit.weights=[{', '.join(['0.1'] * (loops - 1) + ['1.0'])}]")
        return [float(w) for w in self.weights]


EXIT_DISTILL = ("final", "teacher", "none")


@dataclass
class CheckpointConfig:
    save_every: int = 1000
    save_final: bool = True  # false: a benchmark's run ends without a checkpoint of its last step
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path
    save_timeout_min: float = 30.0  # a save that takes longer ends the run as stalled


@dataclass
class EvalConfig:
    every: int = 500
    batches: int = 10
    # lm-evaluation-harness tasks scored on the final checkpoint (rank 0, exported to HF), e.g.
    # [lambada_openai, hellaswag] or the offline [relaxrec_pydoc_lastword]; empty: none
    tasks: list = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None  # first N samples of each task
    include_path: list = field(default_factory=list)  # folders of task YAMLs
    batch_size: int = 8


@dataclass
class LoggingConfig:
    every: int = 1
    wandb_project: str = "relaxrec"
    wandb_group: str | None = None
    wandb_mode: str = "auto"  # auto (offline without WANDB_API_KEY) | online | offline | disabled


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def tokens(self) -> int:
        return self.optim.train_steps * self.optim.global_batch_size * self.data.seq_length

    def _validate_fp8(self) -> None:
        m = self.model
        if not m.fp8:
            return
        if m.fp8_recipe == "delayed":
            raise UserError("model.fp8_recipe=delayed keeps one amax history per module, but each shared layer "
                            "runs once per loop on differently scaled inputs; use tensorwise, blockwise or mxfp8")
        if m.fp8_recipe not in FP8_RECIPES:
            raise UserError(f"model.fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {m.fp8_recipe!r}")
        if m.fp8_format not in ("hybrid", "e4m3"):
            raise UserError(f"model.fp8_format must be hybrid or e4m3, got {m.fp8_format!r}")
        if m.dtype != "bf16":
            raise UserError(f"model.fp8 trains in FP8 around bf16 weights; set model.dtype=bf16 (got {m.dtype})")

    def _validate_exit(self) -> None:
        e = self.exit
        if not e.enabled:
            return
        if e.distill not in EXIT_DISTILL:
            raise UserError(f"exit.distill must be one of {', '.join(EXIT_DISTILL)}, got {e.distill!r}")
        if e.distill == "teacher" and not self.kd.enabled:
            raise UserError("exit.distill=teacher distills the earlier exits from the KD teacher; set "
                            "kd.enabled=true, or exit.distill=final")
        if not 0.0 <= e.alpha <= 1.0 or e.temperature <= 0:
            raise UserError("exit.alpha must be in [0, 1] and exit.temperature > 0")
        if not isinstance(e.weights, list) or not all(isinstance(w, (int, float)) and w >= 0 for w in e.weights):
            raise UserError(f"exit.weights must be a list of non-negative numbers, got {e.weights!r}")
        if e.weights and e.weights[-1] <= 0:
            raise UserError("exit.weights: the last loop's weight must be positive (it is the model's output)")
        if not self.model.relaxed:
            r = self.model.recursion
            if r.loops < 2:
                raise UserError("exit.enabled needs model.recursion.loops >= 2: one loop has no earlier exit")
            if r.strategy != "cycle":
                raise UserError("exit.enabled needs model.recursion.strategy=cycle: with sequence, the hidden "
                                "state is a pass through the whole model only after the last layer")
            e.loop_weights(r.loops)

    def _validate_ranges(self) -> None:
        """Every number and choice in its range, named by its key (types: _coerce, when loading;
        model.recursion checks itself: recursion.RecursionSpec)."""
        positive = {"optim.global_batch_size": self.optim.global_batch_size,
                    "optim.micro_batch_size": self.optim.micro_batch_size, "optim.train_steps": self.optim.train_steps,
                    "optim.lr": self.optim.lr, "data.seq_length": self.data.seq_length,
                    "checkpoint.save_every": self.checkpoint.save_every, "checkpoint.keep_last": self.checkpoint.keep_last,
                    "checkpoint.save_timeout_min": self.checkpoint.save_timeout_min,
                    "logging.every": self.logging.every, "eval.batches": self.eval.batches,
                    "eval.batch_size": self.eval.batch_size, "parallel.tp": self.parallel.tp,
                    "parallel.pp": self.parallel.pp, "parallel.stall_floor_s": self.parallel.stall_floor_s,
                    "parallel.collective_timeout_min": self.parallel.collective_timeout_min,
                    "data.build_timeout_min": self.data.build_timeout_min,
                    "model.convert_timeout_min": self.model.convert_timeout_min,
                    "optim.max_nonfinite_in_a_row": self.optim.max_nonfinite_in_a_row,
                    "optim.eps": self.optim.eps}
        for key, value in positive.items():
            if not value > 0:
                raise UserError(f"{key} must be > 0, got {value}")
        non_negative = {"optim.min_lr": self.optim.min_lr, "optim.warmup_steps": self.optim.warmup_steps,
                        "optim.weight_decay": self.optim.weight_decay, "optim.clip_grad": self.optim.clip_grad,
                        "eval.every": self.eval.every}
        for key, value in non_negative.items():
            if value < 0:
                raise UserError(f"{key} must be >= 0, got {value}")
        if not 0.0 <= self.optim.decay_fraction <= 1.0:
            raise UserError(f"optim.decay_fraction must be in [0, 1], got {self.optim.decay_fraction}")
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise UserError(f"optim.betas must be two numbers in [0, 1), got {list(self.optim.betas)}")
        if self.parallel.stall_factor <= 1:
            raise UserError(f"parallel.stall_factor must be > 1, got {self.parallel.stall_factor}")
        if self.logging.wandb_mode not in WANDB_MODES:
            raise UserError(f"logging.wandb_mode must be one of {', '.join(WANDB_MODES)}, got {self.logging.wandb_mode!r}")

    def validate(self, world_size: int | None = None) -> None:
        o, p = self.optim, self.parallel
        if not self.model.source and not self.model.relaxed:
            raise UserError("model.source (or model.relaxed) is required")
        self._validate_ranges()
        if p.grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise UserError(f"parallel.grad_reduce_dtype must be one of {', '.join(GRAD_REDUCE_DTYPES)}, "
                            f"got {p.grad_reduce_dtype!r}")
        if p.zero_stage not in (0, 1, 2):
            raise UserError(f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage}")
        if self.model.dtype not in ("fp32", "bf16", "fp16"):
            raise UserError(f"model.dtype must be fp32, bf16 or fp16, got {self.model.dtype!r}")
        if p.zero_stage == 0 and self.model.dtype != "fp32":
            raise UserError(f"parallel.zero_stage=0 with model.dtype={self.model.dtype} would update "
                            f"{self.model.dtype} weights with no fp32 master copy; use zero_stage 1 or 2")
        self._validate_fp8()
        self._validate_exit()
        if p.pp > 1 and p.zero_stage > 1:
            raise UserError("DeepSpeed ZeRO-2 cannot be combined with pipeline parallelism; use zero_stage=1")
        if p.tp > 1 and p.zero_stage > 1:
            # ZeRO-2 reduce-scatters each gradient as backward produces it, before the TP sums of
            # training.grads (row-parallel LoRA B, SP norms) could run on it
            raise UserError("DeepSpeed ZeRO-2 cannot be combined with tensor parallelism; use zero_stage=1")
        if o.schedule not in ("cosine", "wsd"):
            raise UserError(f"optim.schedule must be cosine or wsd, got {o.schedule!r}")
        if not 0.0 <= self.kd.alpha <= 1.0 or self.kd.temperature <= 0:
            raise UserError("kd.alpha must be in [0, 1] and kd.temperature > 0")
        if not isinstance(self.eval.tasks, list) or not all(isinstance(t, str) for t in self.eval.tasks):
            raise UserError(f"eval.tasks must be a list of task names, got {self.eval.tasks!r}")
        if self.eval.tasks and not self.checkpoint.save_final:
            raise UserError("eval.tasks scores the final checkpoint, which checkpoint.save_final=false leaves out; "
                            "drop one of them")
        if len(self.data.blend) % 2 or not self.data.blend:
            raise UserError("data.blend must be a non-empty list of weight, prefix pairs")
        if world_size is not None:
            if world_size % (p.tp * p.pp):
                raise UserError(f"world size {world_size} is not a multiple of TP*PP = {p.tp * p.pp}")
            dp = world_size // (p.tp * p.pp)
            if o.global_batch_size % (o.micro_batch_size * dp):
                raise UserError(f"global_batch_size {o.global_batch_size} is not a multiple of micro_batch_size "
                                f"{o.micro_batch_size} x data-parallel size {dp}")


def _build(cls, data: dict, where: str, base=None):
    """cls from a YAML mapping: each key over `base` (the default: cls(), or the parent's default for a
    section, e.g. model.recursion's rank 512)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    base = cls() if base is None else base
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{where}.{key}: unknown key; valid keys: {', '.join(fields)}")
        sub = _dataclass_type(fields[key].type)
        current = getattr(base, key)
        kwargs[key] = _build(sub, value, f"{where}.{key}", current) if sub else _coerce(value, current, f"{where}.{key}")
    return _replaced(base, kwargs, where)


def _replaced(section, values: dict, where: str):
    """The section with these values, through its own checks (model.recursion has some): their
    message, which starts with the field's name, comes after the section's key."""
    try:
        return dataclasses.replace(section, **values)
    except UserError as e:
        raise UserError(f"{where}.{e}") from None


def _dataclass_type(annotation) -> type | None:
    candidates = {c.__name__: c for c in (RunConfig, RecursionSpec, ModelConfig, ParallelConfig, DataConfig,
                                          OptimConfig, KDConfig, ExitConfig, CheckpointConfig, EvalConfig,
                                          LoggingConfig)}
    return candidates.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def _coerce(value: Any, like: Any, where: str) -> Any:
    """The value in the type of the field's default: YAML reads 3e-4 as a string (YAML 1.1), so
    numbers in strings are converted; a bool, an integer, a list must be one; anything else is a
    one-line UserError naming the key."""
    if like is None:  # optional fields (model.relaxed, eval.limit, ...): checked where they are used
        return value
    if isinstance(like, Enum):
        return choice(type(like), value, where)
    if isinstance(value, str) and isinstance(like, (int, float)) and not isinstance(like, bool):
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    kind = type(like)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
    elif kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
    elif kind is str and not isinstance(value, str):
        raise UserError(f"{where}: expected a string, got {value!r}")
    return value


def plain(config) -> dict:
    """A config (or a section of it) as plain values, each choice as it is written in YAML: for JSON,
    wandb and the training state."""
    return dataclasses.asdict(config, dict_factory=lambda items: {k: v.value if isinstance(v, Enum) else v
                                                                  for k, v in items})


def apply_override(cfg: TrainConfig, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep:
        raise UserError(f"override {item!r}: expected dotted.key=value")
    parts, chain = key.split("."), [cfg]  # chain: the config, then each section down to the key's
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(chain[-1]) or not hasattr(chain[-1], p):
            raise UserError(f"override {item!r}: unknown key {key!r}")
        chain.append(getattr(chain[-1], p))
    obj = chain[-1]
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)}:
        raise UserError(f"override {item!r}: unknown key {key!r}")
    current = getattr(obj, parts[-1])
    if dataclasses.is_dataclass(current):
        raise UserError(f"override {item!r}: {key} is a section; set one of its keys, e.g. "
                        f"{key}.{dataclasses.fields(current)[0].name}=...")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    # every key sits in a section (the config's own fields are all sections): the section is rebuilt
    setattr(chain[-2], parts[-2], _replaced(obj, {parts[-1]: _coerce(value, current, key)}, ".".join(parts[:-1])))


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A YAML file, or the name of a shipped config (`gemma-2b-relaxed`, `tiny-cpu`, ...), plus overrides."""
    from ..shipped import run_config, run_config_names

    path = Path(path)
    if not path.is_file():
        shipped = run_config(str(path))
        if shipped is None:
            raise UserError(f"{path}: no such config file, nor a shipped config ({', '.join(run_config_names())})")
        path = shipped
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    data.pop("notes", None)  # free text for humans (e.g. how the token budget is derived)
    cfg = _build(TrainConfig, data, path.stem)
    for item in overrides:
        apply_override(cfg, item)
    if isinstance(cfg.optim.betas, list):
        cfg.optim.betas = tuple(cfg.optim.betas)
    return cfg


def lr_at(step: int, o: OptimConfig) -> float:
    """Linear warmup, then cosine to min_lr, or warmup-stable-decay (linear decay over the last fraction)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        t = (step - o.warmup_steps) / max(1, o.train_steps - o.warmup_steps)
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))
    decay_start = int(o.train_steps * (1 - o.decay_fraction))
    if step < decay_start:
        return o.lr
    t = (step - decay_start) / max(1, o.train_steps - decay_start)
    return o.lr + (o.min_lr - o.lr) * min(1.0, t)
