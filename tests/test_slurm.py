"""The SLURM scripts under a real SLURM (tests/slurm_cluster.py: munged, slurmctld and slurmd on
127.0.0.1), submitted with sbatch from a copy of the checkout as users submit them: the batch script
runs from slurmd's spool folder, signals come from scancel and from the time limit, requeues from
the script's own `scontrol requeue`. What one node cannot show (several nodes' rendezvous) is
test_launch's dry run and its two-agent test."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from procs import cmdline, processes_of
from slurm_cluster import Cluster, missing
from tiny import save_run_config, save_token_corpus

from relaxrec_megatron.model.steps import MANIFEST_FILE, latest_checkpoint

ROOT = Path(__file__).parents[1]
STEPS = 40
# the test node has no GPUs and 2 CPUs: the script's own 8 nodes x 8 GPUs x 96 CPUs, overridden as
# a user overrides them
NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing() is not None, reason=missing() or "")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The checkout's files (what a clone has), without its .venv: the job finds `python` on PATH."""
    dest = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if f.split("/")[0] == ".venv":  # a link to an environment is not part of a checkout
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def job(tiny_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sjob")
    save_token_corpus(root / "data")
    save_run_config(root, tiny_dirs["llama"], seq_length=64, train_steps=STEPS, save_every=1000)
    return root


def env_for(job: Path, run: str, **extra) -> dict:
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", CONFIG=str(job / "c.yaml"),
               CHECKPOINT_DIR=str(job / run), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def losses(run_dir: Path) -> list[float]:
    got = metrics(run_dir)
    return [got[s]["loss"] for s in sorted(got)]


def log_of(checkout: Path, job_id: int, name: str = "relaxrec-gemma-2b") -> Path:
    return checkout / "logs" / f"{name}-{job_id}.out"


def wait_for(predicate, what: str, timeout: float = 120, poll: float = 0.02) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, f"no {what} after {timeout}s"
        time.sleep(poll)


def assert_nothing_left(cluster: Cluster, run_dir: Path) -> None:
    time.sleep(1)
    left = {pid: cmdline(pid) for pid in cluster._job_processes()}
    assert left == {}
    assert processes_of(run_dir) == []


@pytest.fixture(scope="module")
def straight(cluster, checkout, job) -> list[float]:
    """`sbatch slurm/uptrain_gemma.sh` of the tiny run, to the end."""
    job_id = cluster.sbatch([*NODE, "slurm/uptrain_gemma.sh"], checkout, env_for(job, "straight"))
    log = log_of(checkout, job_id)
    assert cluster.wait(job_id, ("COMPLETED", "FAILED"), log=log) == "COMPLETED", log.read_text(errors="replace")[-4000:]
    text = log.read_text(errors="replace")
    assert f"[slurm] job {job_id} attempt 1 on " in text and f"[slurm] job {job_id} ended with status 0" in text
    assert f"step {STEPS:>6} loss" in text
    got = losses(job / "straight")
    assert len(got) == STEPS
    assert_nothing_left(cluster, job / "straight")
    return got


def test_sbatch_runs_the_job_to_the_end_with_its_log_under_logs(straight):
    assert len(straight) == STEPS


def test_preempted_mid_step_then_mid_save_the_job_requeues_resumes_and_completes(cluster, checkout, job, straight):
    """Attempt 1: `scancel --signal=USR1 --batch` mid-run. Attempt 2: the same twice while a periodic
    checkpoint is being written (srun signals every process of the step, the writer's helpers too).
    Each time the job saves (or keeps the save in flight as the stop's), exits 75, requeues and
    resumes; attempt 3 completes with every loss equal to the uninterrupted run's, in one log."""
    run_dir, ckpts = job / "preempted", job / "preempted" / "checkpoints"
    job_id = cluster.sbatch([*NODE, "slurm/uptrain_gemma.sh", "checkpoint.save_every=2"], checkout,
                            env_for(job, "preempted"))
    log = log_of(checkout, job_id)
    wait_for(lambda: max(metrics(run_dir), default=0) >= 5, "step 5")
    cluster.scancel("--signal=USR1", "--batch", str(job_id))  # what a preemption notice does
    wait_for(lambda: cluster.show(job_id).get("Restarts") == "1", "the first requeue", poll=0.2)
    first = latest_checkpoint(ckpts)
    in_flight = lambda: any(p > first and not (p / MANIFEST_FILE).exists() for p in ckpts.glob("step_*"))
    wait_for(in_flight, "a save in flight in the second attempt", poll=0.005)
    cluster.scancel("--signal=USR1", "--batch", str(job_id))
    time.sleep(0.3)
    cluster.scancel("--signal=USR1", "--batch", str(job_id))
    assert cluster.wait(job_id, ("COMPLETED", "FAILED"), log=log) == "COMPLETED", log.read_text(errors="replace")[-4000:]
    text = log.read_text(errors="replace")
    assert cluster.show(job_id)["Restarts"] == "2"
    for line in (f"[slurm] job {job_id} attempt 1 on ", "[slurm] USR1: stopping job", "[launch] stopped by SIGUSR1",
                 f"[slurm] checkpoint saved; requeueing job {job_id}", f"[slurm] job {job_id} attempt 2 on ",
                 "(sent during the save of step", f"[slurm] job {job_id} attempt 3 on ", "[train] resumed from",
                 f"[slurm] job {job_id} ended with status 0"):
        assert line in text, line  # every attempt's lines, in one log
    assert losses(run_dir) == straight
    assert_nothing_left(cluster, run_dir)


def test_the_time_limit_signal_saves_before_the_limit_and_the_job_requeues(cluster, checkout, job):
    """--time=3 with the script's --signal=B:USR1@LEAD: the first attempt stops before its limit with
    a checkpoint of the step it reached (none when the notice comes during start-up) and requeues.
    SLURM sends the notice up to 60 s earlier than LEAD asks (sbatch(1)): with LEAD = 120 s it comes
    in the job's first minute and leaves the stop at least 120 s before the limit's kill. (How a
    requeued attempt resumes is the preemption test's.)"""
    run_dir = job / "time-limit"
    steps = 5000  # more than the attempt could run before the notice: only the notice ends it
    job_id = cluster.sbatch([*NODE, "--time=3", "--signal=B:USR1@120", "slurm/uptrain_gemma.sh",
                             f"optim.train_steps={steps}", "checkpoint.save_every=1000"], checkout,
                            env_for(job, "time-limit"))
    log = log_of(checkout, job_id)
    requeued = lambda: cluster.show(job_id).get("Restarts") == "1"
    try:
        wait_for(requeued, "requeue", timeout=240, poll=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; job {cluster.show(job_id)}\n{log.read_text(errors='replace')[-3000:]}") from None
    cluster.scancel(str(job_id))
    text = log.read_text(errors="replace")
    assert "[slurm] USR1: stopping job" in text and f"requeueing job {job_id}" in text, text[-3000:]
    first = max(metrics(run_dir), default=0)  # 0: the notice came during start-up (up to a minute early)
    assert first < steps
    saved = latest_checkpoint(run_dir / "checkpoints")
    assert (saved.name if saved else None) == (f"step_{first:08d}" if first else None)
    assert cluster.wait(job_id, ("CANCELLED", "GONE"), timeout=120, log=log) in ("CANCELLED", "GONE")
    wait_for(lambda: not cluster._job_processes(), "the end of the cancelled job's processes", timeout=60, poll=0.2)
    assert_nothing_left(cluster, run_dir)


def test_prepare_data_as_an_array_job_merges_to_the_one_shot_dataset(cluster, checkout, tmp_path):
    from transformers import AutoTokenizer

    from relaxrec_megatron.cli.main import main
    from relaxrec_megatron.data.pydoc_text import pydoc_topics
    from relaxrec_megatron.hf.smollm import smollm_checkpoint

    AutoTokenizer.from_pretrained(smollm_checkpoint()).save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, text in enumerate(pydoc_topics("heldout")[:9]):
        (corpus / f"{i:02d}.txt").write_text(text)
    env = env_for(tmp_path, "unused", TOKENIZER=tmp_path / "tok", OUTPUT_PREFIX=tmp_path / "sh" / "c", WORKERS=1)
    job_id = cluster.sbatch(["--array=0-2", "--cpus-per-task=1", "slurm/prepare_data.sh", str(corpus)], checkout, env)
    for task in range(3):
        log = checkout / "logs" / f"relaxrec-data-{job_id}_{task}.out"
        wait_for(lambda: cluster.state(f"{job_id}_{task}") == "COMPLETED", f"task {task}", timeout=300, poll=0.5)
        assert f"[data] shard {task}/3 on " in log.read_text(errors="replace")
    common = ["--tokenizer", str(tmp_path / "tok"), "--workers", "0", "--quiet"]
    assert main(["data", "prepare", str(corpus), "--output-prefix", str(tmp_path / "whole"), *common]) == 0
    assert main(["data", "merge", str(tmp_path / "sh" / "c"), "--output-prefix", str(tmp_path / "merged")]) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"whole{suffix}").read_bytes()


def test_submitted_without_the_environment_the_job_fails_at_once_in_one_line(cluster, checkout, job):
    env = env_for(job, "no-env")
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # no activated environment, and the copy has no .venv
    job_id = cluster.sbatch([*NODE, "slurm/uptrain_gemma.sh"], checkout, env)
    log = log_of(checkout, job_id)
    assert cluster.wait(job_id, ("COMPLETED", "FAILED"), timeout=60, log=log) == "FAILED"
    errors = [line for line in log.read_text().splitlines() if line.startswith("relaxrec:")]
    assert errors == ["relaxrec: no Python environment with relaxrec_megatron: run 'source tools/env.sh' in the "
                      "checkout (or activate the environment it is installed in) before launching or submitting"]
    assert not (job / "no-env").exists()
