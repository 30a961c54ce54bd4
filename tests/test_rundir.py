"""A run folder that never loses work, driven as users drive it (`relaxrec train` processes): resume
from the newest complete checkpoint whatever `latest` says or a save left behind, one run per
folder, the conversion in init/ matching the config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import blocks, processes_of
from tiny import save_run_config, save_token_corpus

from relaxrec_megatron.model.steps import MANIFEST_FILE, incomplete, latest_checkpoint, step_folders

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    save_token_corpus(root / "data")
    save_run_config(root, tiny_dirs["llama"], seq_length=32, train_steps=6, save_every=2)
    return root


def train(job: Path, run: str, *overrides: str, wait: bool = True):
    cmd = [sys.executable, "-m", "relaxrec_megatron.cli.main", "train", "--config", str(job / "c.yaml"),
           f"run.output_dir={job / run}", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if not wait:
        return subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_takes_the_newest_complete_checkpoint_whatever_latest_says(job):
    run_dir, ckpts = job / "resume", job / "resume" / "checkpoints"
    assert train(job, "resume").returncode == 0  # saves steps 2, 4, 6; keeps the last 2
    assert [p.name for p in step_folders(ckpts)] == ["step_00000006", "step_00000004"]
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00junk")  # `latest` is only a hint
    big = max((p for p in (ckpts / "step_00000006").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:-100])  # truncated: step 6 is not complete any more
    out = train(job, "resume", "optim.train_steps=8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"[train] skipping {ckpts / 'step_00000006'}: {big.relative_to(ckpts / 'step_00000006')} has" in out.stdout
    assert f"[train] resumed from {ckpts / 'step_00000004'} at step 4" in out.stdout
    assert steps(run_dir)[-4:] == [5, 6, 7, 8]
    assert latest_checkpoint(ckpts).name == "step_00000008"
    assert [p.name for p in step_folders(ckpts)] == ["step_00000008", "step_00000006"]  # the broken one replaced

    for folder in step_folders(ckpts):
        (folder / MANIFEST_FILE).unlink()  # saves that never finished
    out = train(job, "resume", "optim.train_steps=10")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"relaxrec train: error: {ckpts} has 2 checkpoint folder(s) "
                                                          "and none is complete (step_00000008: no manifest")
    assert steps(run_dir)[-1] == 8  # nothing trained


def test_a_relaunch_with_other_recursion_settings_is_refused(job):
    assert train(job, "recipe", "optim.train_steps=2").returncode == 0
    out = train(job, "recipe", "optim.train_steps=4", "model.recursion.loops=4", "model.recursion.rank=2")
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert f"{job / 'recipe' / 'init' / 'student'} was converted with other settings (recursion: " in line
    assert "'loops': 2" in line and "'loops': 4" in line and "remove" in line
    assert steps(job / "recipe") == [1, 2]


def test_one_run_per_folder_and_a_dead_runs_lock_is_taken_over(job):
    first = train(job, "locked", "optim.train_steps=5000", "checkpoint.save_every=5000", wait=False)
    try:
        end = time.time() + 120
        while not (job / "locked" / "metrics.jsonl").is_file():
            assert first.poll() is None and time.time() < end, first.stdout.read() if first.poll() else "no step"
            time.sleep(0.1)
        holder = json.loads((job / "locked" / ".lock").read_text())
        second = train(job, "locked", "optim.train_steps=2")
        assert second.returncode == 2
        assert (f"run.output_dir={job / 'locked'} is in use by another run (pid {holder['pid']} on "
                in second.stderr)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    third = train(job, "locked", "optim.train_steps=2", "checkpoint.resume=none")
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"[train] taking over {job / 'locked' / '.lock'} from a run that is gone (pid {holder['pid']}" in third.stdout
    assert not (job / "locked" / ".lock").exists()  # released at the end


def test_the_sample_order_does_not_depend_on_train_steps(job):
    """The first steps of a 3-step run and of a 60-step run see the same samples (the learning rate
    is the warmup's in both), so extending optim.train_steps on resume keeps the data planned."""
    losses = {}
    for steps_ in (3, 60):
        run = f"order-{steps_}"
        assert train(job, run, f"optim.train_steps={steps_}", "checkpoint.save_every=1000").returncode == 0
        lines = (job / run / "metrics.jsonl").read_text().splitlines()
        losses[steps_] = [json.loads(line)["loss"] for line in lines][:3]
    assert losses[3] == losses[60]


def test_a_blend_keeps_its_first_samples_when_the_run_grows(job, tmp_path):
    """Two components, one twice the other's weight: the first 200 samples of a 200-sample plan and
    of a 5000-sample plan (several epochs of each component) are the same tokens."""
    from tiny import save_token_corpus

    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.data import TokenizerInfo, build_datasets

    other = save_token_corpus(tmp_path / "other", seed=5)
    cfg = load_config(job / "c.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                       f"data.blend=[2.0, {job / 'data'}, 1.0, {other}]"])
    info = TokenizerInfo(vocab_size=96, eod=2)
    small, _ = build_datasets(cfg, info, 200, 16)
    large, _ = build_datasets(cfg, info, 5000, 16)
    assert len(small) == 200 and len(large) == 5000
    assert all((small[i]["tokens"] == large[i]["tokens"]).all() for i in range(200))
    assert len({bytes(large[i]["tokens"].numpy()) for i in range(5000)}) > 200  # more than one pass, reshuffled


@pytest.mark.parametrize("procs, overrides, message", [
    (3, ["parallel.tp=3"], "parallel: TP=3 does not divide num_attention_heads=4"),  # read from the source
    (2, ["parallel.pp=3"], "world size 2 is not a multiple of TP*PP = 3"),
    (2, ["optim.micro_batch_size=0"], "optim.micro_batch_size must be > 0"),
])
def test_a_bad_setting_ends_a_torchrun_launch_in_one_line_before_any_work(job, tmp_path, procs, overrides, message):
    run_dir = tmp_path / "never"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NPROC_PER_NODE=str(procs), MASTER_PORT=str(_port()), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    out = subprocess.run(["bash", str(Path(__file__).parents[1] / "launch" / "torchrun.sh"), str(job / "c.yaml"),
                          f"run.output_dir={run_dir}", *overrides], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr, out.stderr
    assert "Traceback" not in out.stdout + out.stderr and not run_dir.exists()


def test_the_shipped_fp8_config_on_a_machine_without_fp8_fails_at_once(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tools/gpu_check.py checks FP8 there")
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "relaxrec_megatron.cli.main", "train", "--config",
                          "gemma-2b-relaxed-fp8", f"run.output_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and time.time() - started < 60
    assert out.stderr.strip() == ("relaxrec train: error: model.fp8 needs a CUDA GPU with FP8 (compute capability 8.9 "
                                  "or newer), and this machine has none; or set model.fp8=false")
    assert not (tmp_path / "run").exists()


def _port() -> int:
    from relaxrec_megatron.parallel.distributed import free_port

    return free_port()


@pytest.fixture(scope="module")
def straight(job) -> list[float]:
    out = train(job, "straight-single", "eval.every=2", "eval.batches=30")
    assert out.returncode == 0, out.stderr[-2000:]
    return losses_of(job / "straight-single")


def losses_of(run_dir: Path) -> list[float]:
    """step -> loss, the last line of a step winning (steps redone after a restart)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step[rec["step"]] = rec["loss"]
    return [by_step[s] for s in sorted(by_step)]


def _in_flight(ckpts: Path, step: int) -> bool:
    folder = ckpts / f"step_{step:08d}"
    return folder.is_dir() and not (folder / MANIFEST_FILE).exists()


# when to stop a 6-step run that saves every 2 steps and evaluates 30 batches every 2 steps
PHASES = {
    "start-up": None,  # as soon as the process holds its stop signals: imports, conversion, data, model build
    "evaluation": lambda run_dir: (run_dir / "metrics.jsonl").is_file()
                                  and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2,
    "final save": lambda run_dir: _in_flight(run_dir / "checkpoints", 6),
}


@pytest.mark.parametrize("phase", PHASES)
def test_a_stop_in_any_phase_sent_to_every_process_twice_loses_nothing(job, straight, phase):
    """USR1 to the run's whole process group (what slurmstepd does), twice: the run ends with a
    checkpoint it resumes from (or complete, at the final save), and the relaunch's losses are the
    uninterrupted run's."""
    run = f"stop-{phase.replace(' ', '-')}"
    run_dir = job / run
    proc = train(job, run, "eval.every=2", "eval.batches=30", wait=False)
    end = time.time() + 120
    came = PHASES[phase] or (lambda _: blocks(proc.pid, signal.SIGUSR1))
    while not came(run_dir):
        assert proc.poll() is None and time.time() < end, f"{phase} never came"
        time.sleep(0.01)
    for _ in range(2):
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(0.3)
    console = proc.communicate(timeout=120)[0]
    if phase == "final save":
        assert proc.returncode == 0, console[-3000:]  # the stop came at the end: the run is complete
    else:
        assert proc.returncode == 75, console[-3000:]
        assert f"[train] stopped by SIGUSR1 (sent during {'start-up' if phase == 'start-up' else 'the evaluation'}" \
            in console, console[-3000:]
        again = train(job, run, "eval.every=2", "eval.batches=30")
        assert again.returncode == 0, again.stderr[-3000:]
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000006"
    assert losses_of(run_dir) == straight
    assert processes_of(run_dir) == []


@pytest.mark.parametrize("disk", ["full", "read-only run folder"])
def test_a_disk_that_cannot_take_a_save_is_one_line_before_it(job, tmp_path, disk):
    """Two ranks, checkpoints/ on a small tmpfs that holds one checkpoint, not two: the save is not
    begun (a rank failing inside megatron's save would leave the other waiting in its collectives until
    the save limit), and what was saved is kept. A read-only run folder is refused before any work."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    if disk == "read-only run folder":
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        if disk == "read-only run folder":
            run_dir = mount
        else:
            run_dir = tmp_path / "run"
            run_dir.mkdir()
            (run_dir / "checkpoints").symlink_to(mount)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(NPROC_PER_NODE="2", MASTER_PORT=str(_port()), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
        out = subprocess.run(["bash", str(Path(__file__).parents[1] / "launch" / "torchrun.sh"), str(job / "c.yaml"),
                              f"run.output_dir={run_dir}", "optim.train_steps=6", "checkpoint.keep_last=3"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
        more = " (and 1 more rank(s))"  # both ranks write to the one disk
        ckpts = run_dir / "checkpoints"
        if disk == "read-only run folder":
            assert errors == [f"relaxrec train: error: run.output_dir={run_dir}: cannot write there (Read-only file "
                              "system); make it writable or choose another run.output_dir"], out.stderr[-3000:]
        else:
            kept = step_folders(mount)
            assert kept and latest_checkpoint(mount) == kept[0] and all(incomplete(p) is None for p in kept)
            assert len(errors) == 1 and errors[0].startswith(f"relaxrec train: error: not saving {ckpts}/step_") \
                and "a checkpoint needs about" in errors[0] and errors[0].endswith(
                f"{more}; free space and relaunch: the run resumes from {ckpts / kept[0].name}, which is intact"), \
                out.stderr[-3000:]
        assert processes_of(run_dir) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
