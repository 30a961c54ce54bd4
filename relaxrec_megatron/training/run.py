"""`relaxrec train`: prepare the student and teacher checkpoints, build data, train, checkpoint, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..console import quiet_third_party
from ..errors import UserError
from .config import TrainConfig, plain
from .preflight import check_against_model, check_runtime


class Preempted(Exception):
    """The run stopped on a signal after every rank saved the checkpoint of `step` (or, stopped
    during start-up, with the checkpoint it had, if any)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, records: list[dict]):
        where = f"checkpoint {checkpoint} saved" if checkpoint is not None else "no checkpoint yet"
        super().__init__(f"stopped by {signal_name} at step {step}: {where}; "
                         "relaunch with checkpoint.resume=auto to continue")
        self.step, self.checkpoint, self.records = step, checkpoint, records


def prepare_checkpoints(cfg: TrainConfig, run_dir: Path) -> tuple[Path, Path | None]:
    """Relaxed student init and (for KD) the teacher as a 1-loop model: the source itself, exactly.
    Rank 0 opens the models and makes what the run needs under RUN/init, on the run's shared file
    system; the other ranks read the folders it names and never ask the hub (whose cache may be a
    node's own, and whose request limits a thousand ranks would meet)."""
    from ..hf.convert import convert_to_relaxed
    from ..model.reference import Form, Kind, open_as
    from ..recursion import RecursionSpec
    from .rundir import check_recipe, recipe, record_recipe

    teacher = run_dir / "init" / "teacher" if cfg.kd.enabled else None
    dtype = cfg.model.dtype

    def made_once(folder: Path, made_from: dict, make) -> None:
        """`make(folder)` unless a relaunch finds it made from the same recipe."""
        if (folder / "config.json").is_file():
            check_recipe(folder, made_from)
        else:
            make(folder)
            record_recipe(folder, made_from)

    def convert() -> str:
        source = cfg.model.source or None  # a folder, a hub id or builtin:smollm2-135m (hf.checkpoint)
        student = run_dir / "init" / "student"
        relaxed = open_as(cfg.model.relaxed, "model.relaxed", f"model.relaxed={cfg.model.relaxed}") \
            if cfg.model.relaxed else None
        if relaxed is None:
            made_once(student, recipe(cfg, "student"),
                      lambda out: convert_to_relaxed(source, out, cfg.model.recursion, dtype=dtype, overwrite=True))
        elif relaxed.form is Form.HF_FOLDER:
            student = relaxed.path  # trained from where it is
        elif relaxed.kind is Kind.MEGATRON:  # exported once
            made_once(student, {"relaxed": cfg.model.relaxed}, lambda out: export_relaxed(cfg.model.relaxed, out))
        else:  # a hub id: fetched, and copied where every node reads it
            made_once(student, {"relaxed": cfg.model.relaxed}, lambda out: copy_folder(relaxed.hf_folder(), out))
        if teacher is not None:
            if not source:
                raise UserError("kd.enabled needs model.source (the teacher)")
            made_once(teacher, recipe(cfg, "teacher"),
                      lambda out: convert_to_relaxed(source, out, RecursionSpec.one_loop(), dtype=dtype,
                                                     overwrite=True, progress=False))
        return str(student)

    return Path(on_rank0(convert, cfg.model.convert_timeout_min * 60)), teacher


def copy_folder(folder: Path, out: Path) -> None:
    """A whole copy of `folder` (the hub cache's links followed) at `out`, or none."""
    import shutil

    from ..files import atomic_output_dir

    with atomic_output_dir(out, overwrite=True) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)


def export_relaxed(name: str, out: Path) -> None:
    """`relaxrec export hf-relaxed NAME OUT` in a process of its own: reading a dist checkpoint needs a
    process group of one, and this one belongs to the run."""
    cmd = [sys.executable, "-m", "relaxrec_megatron.cli.main", "export", "hf-relaxed", name, str(out), "--quiet",
           "--overwrite"]
    print(f"[train] exporting model.relaxed={name} to {out}", flush=True)
    done = subprocess.run(cmd, env={k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS},
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise UserError(f"model.relaxed={name}: its export failed: {last}")


def on_rank0(work, timeout_s: float | None = None):
    """`work()` on rank 0 while the others wait, on the default group or, given `timeout_s`, on a group
    with that timeout of its own; what it returns comes back on every rank, and a UserError on rank 0
    is raised on every rank."""
    from ..parallel.distributed import long_wait_group

    group = long_wait_group(timeout_s) if timeout_s is not None and dist.get_world_size() > 1 else None
    outcome: list = [None, None]  # error, result
    if dist.get_rank() == 0:
        try:
            outcome[1] = work()
        except UserError as e:
            outcome[0] = str(e)
    dist.broadcast_object_list(outcome, src=0, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    if outcome[0]:
        raise UserError(outcome[0])
    return outcome[1]


def check_data(cfg: TrainConfig) -> None:
    """data.blend's datasets exist, checked by rank 0 before the conversion, and every rank raises a
    one-line error if not; rank 0 warns when the run repeats them."""
    on_rank0(lambda: data_check(cfg), cfg.data.build_timeout_min * 60)


def data_check(cfg: TrainConfig) -> None:
    from ..data.indexed import blend_use, repeat_warning

    try:
        uses = blend_use([float(w) for w in cfg.data.blend[0::2]], [str(p) for p in cfg.data.blend[1::2]],
                         cfg.data.split, cfg.tokens())
    except UserError as e:
        raise UserError(f"data.blend: {e}") from None
    warning = repeat_warning(uses)
    if warning:
        print(f"[train] warning: {warning}", flush=True)


def build_data(cfg: TrainConfig, student_dir: Path):
    from .data import TokenizerInfo, build_datasets

    hf = json.loads((student_dir / "config.json").read_text())
    eos = hf.get("eos_token_id")
    info = TokenizerInfo(vocab_size=hf["vocab_size"], eod=eos[0] if isinstance(eos, list) else eos)
    train_samples = cfg.optim.train_steps * cfg.optim.global_batch_size
    valid_samples = cfg.eval.batches * cfg.optim.global_batch_size  # every evaluation reads the same batches
    # megatron's builder lets rank 0 build the index caches first and synchronises the others itself
    return build_datasets(cfg, info, train_samples, valid_samples)


def train(cfg: TrainConfig, hooks=None) -> list[dict]:
    """Runs (or resumes) the configured uptraining; a stop signal ends it with Preempted after a
    checkpoint. hooks: trainer.Hooks."""
    from ..runtime import environment, library_settings

    with environment(library_settings()):  # also in processes started without the CLI (the demo's ranks)
        quiet_third_party()  # before megatron is imported
        return _locked_train(cfg, hooks)


def _locked_train(cfg: TrainConfig, hooks) -> list[dict]:
    from ..parallel.distributed import init_distributed
    from ..parallel.process import children_die_with_this_process, die_with_parent
    from ..parallel.torchrun import AGENT_PID_ENV
    from .rundir import RunLock
    from .stops import StopSignals

    if os.environ.get(AGENT_PID_ENV):  # started by torchrun: never outlive it
        die_with_parent(int(os.environ[AGENT_PID_ENV]))
    children_die_with_this_process()
    signals = StopSignals.for_this_process()  # before the slow setup, and before any helper starts
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.run.seed)
    cfg.validate(dist.get_world_size())
    check_runtime(cfg)  # every rank: its own GPU
    on_rank0(lambda: check_against_model(cfg))  # before anything is written or converted
    run_dir = Path(cfg.run.output_dir)
    lock = RunLock(run_dir)
    on_rank0(lock.acquire)
    try:
        return _train(cfg, run_dir, signals, hooks)
    finally:
        lock.release()


def _train(cfg: TrainConfig, run_dir: Path, signals, hooks) -> list[dict]:
    from ..model.steps import incomplete
    from ..parallel.distributed import collective_timeout
    from .checkpoints import CheckpointManager
    from .logger import Logger
    from .trainer import Trainer
    from .validator import Validator

    if dist.get_rank() == 0:
        (run_dir / "config.json").write_text(json.dumps(plain(cfg), indent=1, default=str))
    check_eval_tasks(cfg)
    check_data(cfg)  # before the conversion, which can take hours
    student_dir, teacher_dir = prepare_checkpoints(cfg, run_dir)
    with collective_timeout(cfg.data.build_timeout_min * 60):  # rank 0 builds the indices, the others wait
        train_ds, valid_ds = build_data(cfg, student_dir)
    trainer = Trainer(cfg, student_dir, teacher_dir, signals, hooks)
    trainer.setup(train_ds)
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, trainer.hooks)
    resume = cfg.checkpoint.resume
    latest = checkpoints.resume_point() if resume == "auto" else (Path(resume) if resume not in ("none", "") else None)
    if latest is not None and resume != "auto" and incomplete(latest) is not None:
        raise UserError(f"checkpoint.resume={resume}: {incomplete(latest)}; name a complete step folder")
    if latest is not None:
        checkpoints.load(trainer, latest)
        if dist.get_rank() == 0:
            print(f"[train] resumed from {latest} at step {trainer.step}", flush=True)
    if trainer.step < cfg.optim.train_steps and trainer.agree_stop():  # sent during start-up: nothing to save
        raise stopped_by(trainer, checkpoints, [])
    logger = Logger(cfg, run_dir, {k: trainer.settings.hf[k] for k in ("num_loops", "recursion_strategy",
                                                                        "shared_init", "lora_ranks")})
    records = trainer.train(checkpoints, logger, Validator(valid_ds) if valid_ds is not None else None)
    final = trainer.step >= cfg.optim.train_steps
    if trainer.stop_requested and (not final or cfg.eval.tasks):  # a stop at the last step is the end, but
        logger.close()                                              # for the scoring, which the relaunch does
        raise stopped_by(trainer, checkpoints, records)
    if cfg.eval.tasks and final and dist.get_rank() == 0:
        step = trainer.step
        del trainer  # the scoring process needs the memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results = score_tasks(cfg, checkpoints.latest(), run_dir)
        flat = {f"eval/{task}/{metric}": v for task, row in results.items() for metric, v in row.items()}
        if logger.wandb is not None:
            logger.wandb.log(flat, step=step)
        print("[eval] " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in flat.items()), flush=True)
    logger.close()
    return records


def stopped_by(trainer, checkpoints, records: list[dict]) -> Preempted:
    """The Preempted of an agreed stop, its line left for the launcher."""
    s = trainer.signals
    how = f"{s.received} (sent during {s.received_in})" if s.received else "a signal to another rank"
    stopped = Preempted(how, trainer.step, checkpoints.latest(), records)
    tell_launcher(stopped)
    return stopped


def check_eval_tasks(cfg: TrainConfig) -> None:
    """An unknown name in eval.tasks fails before training, not after it: rank 0 checks, every rank raises."""
    if not cfg.eval.tasks:
        return

    on_rank0(lambda: eval_tasks_check(cfg), CHECK_TASKS_TIMEOUT_S)


def eval_tasks_check(cfg: TrainConfig) -> None:
    if not cfg.eval.tasks:
        return
    from ..evaluation import harness

    harness.quiet()
    try:
        harness.check_tasks(cfg.eval.tasks, harness.task_manager(cfg.eval.include_path, cfg.eval.tasks))
    except UserError as e:
        raise UserError(f"eval.tasks: {e}") from None


CHECK_TASKS_TIMEOUT_S = 1800  # rank 0 indexes the harness's tasks (and may download their datasets)

# set by torchrun / the local launcher for the training processes; the scoring process is a run of its own
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def score_tasks(cfg: TrainConfig, checkpoint: Path, run_dir: Path) -> dict:
    """`relaxrec eval tasks` on the final checkpoint, in a process of its own (no process group, its own
    device memory); returns {task: {metric: value}} and leaves the report in run_dir/eval/."""
    e = cfg.eval
    out = run_dir / "eval" / f"tasks-{checkpoint.name}.json"
    cmd = [sys.executable, "-m", "relaxrec_megatron.cli.main", "eval", "tasks", str(checkpoint),
           "--tasks", ",".join(e.tasks), "--batch-size", str(e.batch_size), "--output", str(out)]
    cmd += ["--num-fewshot", str(e.num_fewshot)] if e.num_fewshot is not None else []
    cmd += ["--limit", str(e.limit)] if e.limit is not None else []
    for folder in e.include_path:
        cmd += ["--include-path", folder]
    print(f"[eval] scoring {checkpoint} on {', '.join(e.tasks)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise UserError(f"scoring {checkpoint} on eval.tasks failed (exit {rc}); the checkpoint is complete, "
                        f"rerun with: relaxrec eval tasks {checkpoint} --tasks {','.join(e.tasks)}")
    return next(iter(json.loads(out.read_text())["models"].values()))["results"]


def tell_launcher(stopped: Preempted) -> None:
    """Each node's local rank 0 leaves the stop in the file its launcher named (torchrun itself
    only sees the signal it forwarded, not how the workers ended)."""
    from ..parallel.torchrun import STOP_FILE_ENV

    path = os.environ.get(STOP_FILE_ENV)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        if path:
            Path(path).write_text(str(stopped) + "\n")
        if dist.get_rank() == 0:
            print(f"[train] {stopped}", flush=True)


def train_entry(config_path: str, overrides: list[str], records_path: str | None = None, hooks=None) -> None:
    """Entry of one local rank (parallel.local_world.run_world): train, optionally save the records."""
    from ..parallel.distributed import shutdown
    from .config import load_config

    try:
        records = train(load_config(config_path, overrides), hooks)
        if records_path is not None:
            torch.save(records, f"{records_path}.rank{dist.get_rank()}.pt")
    finally:
        shutdown()
