"""The launch scripts, launched: real torchrun agents and workers on 127.0.0.1, real signals, dead,
stalled and orphaned workers, and the dry runs. The SLURM scripts under a real SLURM: test_slurm."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import blocks, children, cmdline, processes_of
from tiny import save_run_config, save_token_corpus

from relaxrec_megatron.errors import EXIT_REQUEUE
from relaxrec_megatron.model.steps import latest_checkpoint
from relaxrec_megatron.parallel.distributed import free_port

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


def agent_and_workers(run_dir: Path) -> tuple[int, dict[int, int]]:
    """The torchrun agent's pid and its workers' {LOCAL_RANK: pid}."""
    agent, workers = None, {}
    for proc in Path("/proc").iterdir():
        cmd = cmdline(proc.name) if proc.name.isdigit() else ""
        if f"run.output_dir={run_dir} " in cmd + " " and "parallel.torchrun" in cmd:
            agent = int(proc.name)
    for pid in children(agent) if agent else []:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
            workers[int(dict(kv.split("=", 1) for kv in environ if "=" in kv)["LOCAL_RANK"])] = pid
        except (OSError, ValueError, KeyError):
            continue
    return agent, workers


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
@pytest.mark.oldest
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


def holding(pids) -> bool:
    return bool(pids) and all(blocks(pid, signal.SIGUSR1) for pid in pids)


def workers_holding(run_dir: Path) -> bool:
    workers = agent_and_workers(run_dir)[1]
    return len(workers) == 2 and holding(list(workers.values()))


STARTING = {  # a phase of a launch's start-up -> whether the launch is in it now
    "shell": lambda launch, run_dir: bool(children(launch.proc.pid)),  # launch/torchrun.sh's Python check
    "agent": lambda launch, run_dir: "parallel.torchrun" in cmdline(launch.proc.pid)  # importing, preflight
    and holding([launch.proc.pid]),
    "workers": lambda launch, run_dir: workers_holding(run_dir),  # importing, building the model
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(STARTING))
def test_a_stop_while_the_launch_starts_ends_it_as_a_stop(job, phase):
    """SLURM signals every process of the job step, and a preemption can come as a job starts: in the
    launcher's shell, while its agent imports, while the workers start. Each ends the launch as a stop
    (exit 75 for a requeue, one line) without a traceback and leaves no process. (A Python process holds
    its stop signals from the package's first line: the interpreter's own start-up before it, a few
    milliseconds, is the one time a stop signal still ends it.)"""
    run_dir = job / f"early-{phase}"
    launch = train_launch(job, run_dir.name, env_for())
    end = time.time() + 120
    while not STARTING[phase](launch, run_dir):
        assert launch.proc.poll() is None and time.time() < end, launch.console()
        time.sleep(0.002)
    os.killpg(launch.proc.pid, signal.SIGUSR1)
    assert launch.wait(120) == EXIT_REQUEUE, launch.console()
    assert "[launch] stopped by SIGUSR1" in launch.console() and "Traceback" not in launch.console(tail=0)
    time.sleep(0.5)
    assert processes_of(run_dir) == []


def stand_ins(folder: Path) -> Path:
    """`srun` and `scontrol` that record their calls, for the dry run of a job over several nodes,
    which the one-node SLURM of test_slurm cannot show."""
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
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
def test_every_stop_signal_to_torchrun_saves_and_exits_for_a_requeue(job, straight, sig):
    """Ctrl-C, a closed terminal, SIGQUIT: like SIGTERM and SIGUSR1, the workers finish the step and save."""
    run_dir = job / sig.name
    launch = train_launch(job, sig.name, env_for())
    wait_for_step(launch, run_dir, 2)
    launch.proc.send_signal(sig)
    done = assert_stopped_with_a_checkpoint(launch, run_dir, launch.wait(120))
    assert losses(run_dir) == straight[:done]


def single_process(job: Path, name: str, extra=()) -> Launch:
    """`relaxrec train` in one process, without torchrun."""
    return Launch([sys.executable, "-m", "relaxrec_megatron.cli.main", "train", "--config", str(job / "c.yaml"),
                   f"run.output_dir={job / name}", *extra], env_for(), job / f"{name}.log")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
def test_every_stop_signal_to_a_single_process_saves_and_exits_for_a_requeue(job, sig):
    run_dir = job / f"single-{sig.name}"
    launch = single_process(job, f"single-{sig.name}")
    wait_for_step(launch, run_dir, 2)
    os.killpg(launch.proc.pid, sig)  # the terminal's foreground process group: the process and its helpers
    rc = launch.wait(120)
    assert rc == EXIT_REQUEUE, launch.console()
    done = max(metrics(run_dir))
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{done:08d}" and done < STEPS
    assert f"[train] stopped by {sig.name} (sent during step" in launch.console(tail=0)
    assert processes_of(run_dir) == []


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(job):
    run_dir = job / "twice"
    launch = single_process(job, "twice", ["eval.every=2", "eval.batches=400"])  # a long evaluation after step 2
    wait_for_step(launch, run_dir, 2)
    os.killpg(launch.proc.pid, signal.SIGINT)  # during the evaluation: the run would stop after it
    time.sleep(2.5)  # later than a launcher's forwarded copy of the same Ctrl-C
    os.killpg(launch.proc.pid, signal.SIGINT)
    assert launch.wait(60) == 128 + signal.SIGINT
    assert "[train] second SIGINT: stopping now, without a checkpoint" in launch.console()
    assert processes_of(run_dir) == []


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_resumes_exactly(job, straight):
    run_dir = job / "restart"
    launch = train_launch(job, "restart", env_for(MAX_RESTARTS=2), ["checkpoint.save_every=5"])
    wait_for_step(launch, run_dir, 12)
    _, workers = agent_and_workers(run_dir)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    assert launch.wait(300) == 0, launch.console()
    assert losses(run_dir) == straight  # steps after the last checkpoint (10) are redone the same
    time.sleep(0.5)
    assert processes_of(run_dir) == []


@pytest.mark.slow
def test_workers_do_not_outlive_a_killed_agent(job):
    run_dir = job / "orphans"
    launch = train_launch(job, "orphans", env_for(), ["checkpoint.save_every=2"])  # a save starts helpers
    wait_for_step(launch, run_dir, 4)
    agent, workers = agent_and_workers(run_dir)
    assert agent and len(workers) == 2
    os.kill(agent, signal.SIGKILL)
    end = time.time() + 10
    while processes_of(run_dir) and time.time() < end:  # workers and their forked helpers (same command)
        time.sleep(0.2)
    assert processes_of(run_dir) == []


@pytest.mark.slow
def test_a_stalled_worker_is_named_and_the_run_ends(job):
    """SIGSTOP to one worker: once the first steps have set the step time, the other ends the run within
    stall_factor x that (at least stall_floor_s), with one line naming the stopped rank."""
    run_dir = job / "stalled"
    launch = train_launch(job, "stalled", env_for(), ["parallel.stall_factor=5", "parallel.stall_floor_s=3"])
    wait_for_step(launch, run_dir, 6)
    _, workers = agent_and_workers(run_dir)
    stopped = workers[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        end = time.time() + 60
        while "[train] stalled:" not in launch.console(tail=0) and time.time() < end:
            time.sleep(0.2)
    finally:  # torchrun would SIGKILL the stopped process after its 30 s grace; let it end sooner
        os.kill(stopped, signal.SIGCONT)
    rc = launch.wait(60)
    console = launch.console(tail=0)
    assert rc != 0
    stall = [line for line in console.splitlines() if "[train] stalled:" in line]
    assert len(stall) == 1 and "waiting for rank 1 " in stall[0], console[-3000:]
    time.sleep(0.5)
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


@pytest.mark.parametrize("argv, held", [
    (["python", "-u", "-m", "relaxrec_megatron.cli.main", "train", "--config", "c.yaml"], True),  # torchrun's workers
    (["/venv/bin/python", "/venv/bin/relaxrec", "train", "x=1"], True),  # the console script
    (["python", "/venv/bin/relaxrec", "train", "--print-config"], False),
    (["python", "-m", "relaxrec_megatron.cli.main", "eval", "tasks"], False),
    (["python", "train.py", "train"], False),  # a user's own script that imports the package
    (["python", "-c", "import relaxrec_megatron"], False),
    (["python"], False),
])
def test_only_the_train_command_holds_its_stop_signals_from_the_first_import(argv, held):
    from relaxrec_megatron.startup import is_train_command

    assert is_train_command(argv) is held


@pytest.mark.parametrize("argv, held", [
    (["python", "-m", "relaxrec_megatron.parallel.torchrun", "--nnodes=1", "-m", "relaxrec_megatron.cli.main",
      "train", "--config", "c.yaml"], True),
    (["python", "-m", "relaxrec_megatron.parallel.torchrun", "-m", "relaxrec_megatron.cli.main", "train",
      "--print-config"], False),
    (["python", "-m", "relaxrec_megatron.parallel.torchrun", "-m", "relaxrec_megatron.cli.main", "eval"], False),
    (["python", "-m", "relaxrec_megatron.parallel.torchrun", "script.py"], False),
])
def test_the_launcher_of_a_train_command_holds_its_stop_signals_too(argv, held):
    from relaxrec_megatron.startup import is_train_launch

    assert is_train_launch(argv) is held


def test_slurm_dry_run_prints_the_exact_commands(tmp_path):
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{stand_ins(tmp_path / 'bin')}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DRY_RUN": "1",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_LOG": str(log)}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "uptrain_gemma.sh"), "optim.lr=2e-4"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "nodes=2 gpus_per_node=8 master=127.0.0.1:24242"
    assert lines[1].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash") and "launch/torchrun.sh" in lines[1]
    assert lines[2] == f"python={sys.executable}"
    for part in ["relaxrec_megatron.parallel.torchrun --nnodes=2 --nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=127.0.0.1:24242", "--rdzv-id=4242", "--max-restarts=3",
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2", "--shutdown-timeout=240",
                 "-m relaxrec_megatron.cli.main train", "configs/gemma-2b-relaxed.yaml", "checkpoint.resume=auto",
                 "optim.lr=2e-4"]:
        assert part in lines[3].replace("\\", ""), part  # printf %q escapes the commas


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


def test_a_torchrun_without_shutdown_timeout_gets_the_wait_from_the_launcher(capsys):
    """The torchrun of torch 2.10 and 2.11 has no --shutdown-timeout and waits a fixed 30 s for the
    workers after forwarding a stop: the launcher drops the options a torchrun lacks, says so for all
    but that one, and makes its own agent wait the asked time."""
    from relaxrec_megatron.parallel.torchrun import supported

    tail = ["-m", "relaxrec_megatron.cli.main", "train", "--config", "c.yaml", "optim.lr=1"]
    argv = ["--nnodes=1", "--signals-to-handle=SIGTERM,SIGUSR1", "--shutdown-timeout=240", *tail]
    assert supported(argv, known={"--nnodes", "--signals-to-handle", "--shutdown-timeout"}) == (argv, {})
    keep, dropped = supported(argv, known={"--nnodes"})
    assert keep == ["--nnodes=1", *tail]
    assert dropped == {"--signals-to-handle": "SIGTERM,SIGUSR1", "--shutdown-timeout": "240"}
    assert capsys.readouterr().err == "[launch] this torchrun has no --signals-to-handle: running without\n"
    probe = ("import inspect; from torch.distributed.elastic.multiprocessing import api; "
             "from relaxrec_megatron.parallel.torchrun import wait_on_stop; wait_on_stop(240); "
             "print(inspect.signature(api.PContext.close).parameters['timeout'].default)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["240"], out.stderr[-2000:]
