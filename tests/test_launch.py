"""The launch scripts, launched: real torchrun agents and workers on 127.0.0.1, real signals, the
slurm script with stand-in `srun` and `scontrol`, and their dry runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relaxrec_megatron.errors import EXIT_REQUEUE
from relaxrec_megatron.parallel.distributed import free_port
from relaxrec_megatron.model.checkpoint import latest_checkpoint
from tiny import save_run_config, save_token_corpus

ROOT = Path(__file__).parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def job(tiny_dirs, tmp_path_factory):
    """A tiny run config (2 loops, KD, ZeRO-1) and the world each launch trains in."""
    root = tmp_path_factory.mktemp("launch")
    save_token_corpus(root / "data")
    save_run_config(root, tiny_dirs["llama"], seq_length=64, train_steps=STEPS, save_every=1000)
    return root


def env_for(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    bin_dir = str(Path(sys.executable).parent)  # the launchers run `python` and `torchrun` from PATH
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), NPROC_PER_NODE="2", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Launch:
    """One launch in a session of its own, its console in a log file; killed whole on the way out."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.console()}") from None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def console(self, tail: int = 6000) -> str:
        text = self.log.read_text()
        return text[-tail:] if tail else text


def train_launch(job: Path, name: str, env: dict, extra=()) -> Launch:
    run_dir = job / name
    return Launch(["bash", str(ROOT / "launch" / "torchrun.sh"), str(job / "c.yaml"), f"run.output_dir={run_dir}",
                   *extra], env, job / f"{name}.{len(list(job.glob(f'{name}.*.log')))}.log")


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> its record (the last line of a step wins: steps redone after a resume replace it)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def wait_for_step(launch: Launch, run_dir: Path, step: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while max(metrics(run_dir), default=0) < step:
        assert launch.proc.poll() is None, f"exited with {launch.proc.returncode} before step {step}:\n" \
                                           f"{launch.console()}"
        assert time.time() < end, f"no step {step} after {timeout}s:\n{launch.console()}"
        time.sleep(0.05)


def processes_of(run_dir: Path) -> list[str]:
    """Command lines of live processes that name the run's folder (agents, workers, helpers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"run.output_dir={run_dir} " in cmd + " " and proc.name.isdigit():
            found.append(cmd)
    return found


def losses(run_dir: Path) -> list[float]:
    got = metrics(run_dir)
    return [got[s]["loss"] for s in sorted(got)]


@pytest.fixture(scope="module")
def straight(job) -> list[float]:
    """The uninterrupted run: one torchrun agent, 2 worker processes, evaluating on the way (which
    must not change what the others, evaluating nothing, train)."""
    launch = train_launch(job, "straight", env_for(), ["eval.every=5"])
    assert launch.wait() == 0, launch.console()
    console = launch.console(tail=0)  # the project's lines, not third-party chatter (relaxrec_megatron.console)
    for noise in ("Setting accelerator to CPU", "Building a BlendedDataset", "async save is deprecated",
                  "Apex are not installed", "FutureWarning"):
        assert noise not in console, noise
    got = losses(job / "straight")
    assert len(got) == STEPS
    return got


def assert_stopped_with_a_checkpoint(launch: Launch, run_dir: Path, rc: int) -> int:
    assert rc == EXIT_REQUEUE, launch.console()
    done = max(metrics(run_dir))
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == f"step_{done:08d}", launch.console()
    assert done < STEPS
    assert "[launch] stopped by" in launch.console() and "Traceback" not in launch.console(tail=0)
    time.sleep(0.5)
    assert processes_of(run_dir) == []
    return done


@pytest.mark.slow
def test_usr1_to_torchrun_saves_exits_and_the_relaunch_resumes_exactly(job, straight):
    run_dir = job / "usr1"
    launch = train_launch(job, "usr1", env_for())
    wait_for_step(launch, run_dir, 3)
    launch.proc.send_signal(signal.SIGUSR1)  # what slurm's --signal=B:USR1 reaches torchrun as
    done = assert_stopped_with_a_checkpoint(launch, run_dir, launch.wait(120))

    again = train_launch(job, "usr1", env_for())
    assert again.wait() == 0, again.console()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{done:08d}'} at step {done}" in again.console(tail=0)
    assert losses(run_dir) == straight


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_and_exits(job, straight):
    run_dir = job / "sigterm"
    launch = train_launch(job, "sigterm", env_for())
    wait_for_step(launch, run_dir, 2)
    launch.proc.send_signal(signal.SIGTERM)
    done = assert_stopped_with_a_checkpoint(launch, run_dir, launch.wait(120))
    assert losses(run_dir) == straight[:done]


def stand_ins(folder: Path) -> Path:
    """`srun` that runs the step here (one task: this node) and `scontrol` that records requeues."""
    folder.mkdir(exist_ok=True)
    (folder / "srun").write_text('#!/usr/bin/env bash\n'
                                 'echo "srun $*" >> "$SLURM_LOG"\n'
                                 'while [[ "$1" == --* ]]; do shift; done\n'
                                 'exec "$@"\n')
    (folder / "scontrol").write_text('#!/usr/bin/env bash\n'
                                     'echo "scontrol $*" >> "$SLURM_LOG"\n'
                                     'if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi\n')
    for f in ("srun", "scontrol"):
        (folder / f).chmod(0o755)
    return folder


@pytest.mark.slow
def test_slurm_script_on_usr1_checkpoints_and_requeues_once(job, straight):
    run_dir, log = job / "slurm", job / "slurm-calls.log"
    env = env_for(SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="node-[01]", SLURM_JOB_NUM_NODES=1, SLURM_GPUS_ON_NODE=2,
                  CONFIG=job / "c.yaml", CHECKPOINT_DIR=run_dir, SLURM_LOG=log)
    env["PATH"] = f"{stand_ins(job / 'slurm-bin')}:{env['PATH']}"
    batch = Launch(["bash", str(ROOT / "slurm" / "uptrain_gemma.sh")], env, job / "slurm.log")
    wait_for_step(batch, run_dir, 3)
    batch.proc.send_signal(signal.SIGUSR1)  # --signal=B:USR1@300 signals the batch shell
    assert batch.wait(120) == 0, batch.console()
    calls = log.read_text().splitlines()
    assert [c for c in calls if "requeue" in c] == ["scontrol requeue 4242"], calls
    assert calls[1].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash") and "launch/torchrun.sh" in calls[1]
    done = max(metrics(run_dir))
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{done:08d}" and done < STEPS
    assert "requeueing job 4242" in batch.console(tail=0)
    assert losses(run_dir) == straight[:done]
    assert processes_of(run_dir) == []


@pytest.mark.slow
def test_two_agents_meet_by_rendezvous_and_train_like_one_agent_with_two_processes(job, straight):
    run_dir = job / "two-nodes"
    env = env_for(NNODES=2, NPROC_PER_NODE=1, RDZV_ID="two-nodes")
    agents = [train_launch(job, "two-nodes", {**env, "NODE_RANK": str(n)}) for n in range(2)]
    for agent in agents:
        assert agent.wait() == 0, agent.console()
    assert losses(run_dir) == straight
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{STEPS:08d}"


def test_slurm_dry_run_prints_the_exact_commands(tmp_path):
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{stand_ins(tmp_path / 'bin')}:{os.environ['PATH']}", "DRY_RUN": "1",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_LOG": str(log)}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "uptrain_gemma.sh"), "optim.lr=2e-4"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "nodes=2 gpus_per_node=8 master=127.0.0.1:24242"
    assert lines[1].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash") and "launch/torchrun.sh" in lines[1]
    for part in ["relaxrec_megatron.parallel.torchrun --nnodes=2 --nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=127.0.0.1:24242", "--rdzv-id=4242", "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,"
                 "SIGQUIT,SIGUSR1,SIGUSR2", "--shutdown-timeout=240", "-m relaxrec_megatron.cli.main train",
                 "configs/gemma-2b-relaxed.yaml", "checkpoint.resume=auto", "optim.lr=2e-4"]:
        assert part in lines[2].replace("\\", ""), part  # printf %q escapes the commas


def test_slurm_script_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "uptrain_gemma.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "not inside a SLURM job" in out.stderr


def test_torchrun_wrapper_multi_node_from_env():
    env = {**os.environ, "DRY_RUN": "1", "NNODES": "4", "NODE_RANK": "2", "NPROC_PER_NODE": "8",
           "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400", "STOP_TIMEOUT": "600"}
    out = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), str(ROOT / "configs" / "tiny-cpu.yaml"),
                          "optim.train_steps=5"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for part in ["--nnodes=4", "--nproc-per-node=8", "--node-rank=2", "--rdzv-endpoint=10.1.2.3:29400",
                 "--shutdown-timeout=600", "train --config", "tiny-cpu.yaml", "optim.train_steps=5"]:
        assert part in out.stdout, part
    bad = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "/nonexistent.yaml"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "no such config" in bad.stderr


def test_gpu_requirements_are_pyprojects_dependencies_beyond_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = [d for d in project["dependencies"] if not d.startswith("torch")] + project["optional-dependencies"]["te"]
    got = [ln for ln in (ROOT / "tools" / "gpu_requirements.txt").read_text().splitlines()
           if ln.strip() and not ln.startswith("#")]
    assert got == want
