"""A real one-node SLURM cluster on 127.0.0.1 for the launch tests: munged, slurmctld and slurmd
from Debian's slurm-wlm and munge packages (tools/slurm_packages.sh installs them), with every file
(config, munge key and socket, state, spool, logs) in a temporary folder, free ports, and the node's
real CPU count and memory. The client commands find it through SLURM_CONF.

    with Cluster(tmp) as cluster:
        job = cluster.sbatch(["--cpus-per-task=2", "script.sh"], cwd=..., env=...)
        cluster.wait(job, "COMPLETED")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why a cluster cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "the SLURM tests run the daemons as root"
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (bash tools/slurm_packages.sh installs SLURM and munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    # -- daemons ----------------------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.sock"
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munge' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'munged.seed'}"], check=True, capture_output=True)
        self.pids["munged"] = int((r / "munge" / "munged.pid").read_text())
        cpus = os.cpu_count() or 1
        memory_mb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                             if l.startswith("MemTotal")).split()[1]) // 1024 - 512
        self.conf.write_text(f"""ClusterName=relaxrec
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run([_which("slurmctld"), "-f", str(self.conf), "-i"], check=True, env=self.env,
                       capture_output=True)
        self.pids["slurmctld"] = self._pid(r / "slurmctld.pid")
        subprocess.run([_which("slurmd"), "-f", str(self.conf)], check=True, env=self.env, capture_output=True)
        self.pids["slurmd"] = self._pid(r / "slurmd.pid")
        self._wait_idle()

    def _pid(self, path: Path, timeout: float = 20) -> int:
        end = time.time() + timeout
        while not path.is_file() or not path.read_text().strip():
            if time.time() > end:
                raise RuntimeError(f"no {path.name} after {timeout}s:\n{self.logs()}")
            time.sleep(0.1)
        return int(path.read_text())

    def _wait_idle(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        while True:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if out.stdout.strip() == "idle":
                return
            if time.time() > end:
                raise RuntimeError(f"the node is not idle after {timeout}s ({out.stdout.strip()!r} "
                                   f"{out.stderr.strip()!r}):\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancels every job, stops the daemons and waits until no process of theirs is left."""
        if self.pids.get("slurmctld"):
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
            subprocess.run(["scancel", "-u", "root"], env=self.env, capture_output=True)
            self._wait_no_jobs(30)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid:
                _kill(pid, signal.SIGTERM)
        for pid in self._job_processes():  # anything a job left behind
            _kill(pid, signal.SIGKILL)

    def _wait_no_jobs(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def _job_processes(self) -> list[int]:
        """Processes started by this cluster's jobs (their environment names its SLURM_CONF), not
        its daemons."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            pid = int(proc.name)
            daemon = pid in self.pids.values() or (proc / "cmdline").read_bytes().startswith(b"slurmctld")
            if f"SLURM_CONF={self.conf}".encode() in environ and pid != os.getpid() and not daemon:
                found.append(pid)
        return found

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.is_file():
                out.append(f"--- {name}\n" + path.read_text()[-3000:])
        return "\n".join(out)

    # -- jobs -------------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**(env or os.environ),
                             "SLURM_CONF": str(self.conf)}, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def show(self, job: int | str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=self.env, capture_output=True,
                             text=True)
        fields = {}
        for part in out.stdout.split():
            key, _, value = part.partition("=")
            fields.setdefault(key, value)
        return fields

    def state(self, job: int | str) -> str:
        return self.show(job).get("JobState", "GONE")

    def wait(self, job: int, states: tuple[str, ...] | str, timeout: float = 300, poll: float = 0.5,
             log: Path | None = None) -> str:
        states = (states,) if isinstance(states, str) else states
        end = time.time() + timeout
        while True:
            state = self.state(job)
            if state in states:
                return state
            if time.time() > end:
                tail = log.read_text()[-4000:] if log is not None and log.is_file() else ""
                raise AssertionError(f"job {job} is {state}, not {'/'.join(states)}, after {timeout}s:\n{tail}")
            time.sleep(poll)

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], env=self.env, check=True, capture_output=True, timeout=60)

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, check=True, capture_output=True, text=True,
                              timeout=60).stdout


def _kill(pid: int, sig: int, wait: float = 10) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    end = time.time() + wait
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
