"""Live processes as the launch tests look at them: by command line, from /proc."""

from pathlib import Path


def cmdline(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (the parent in /proc/PID/stat)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def processes_of(run_dir: Path) -> list[str]:
    """Command lines of live processes that name the run's folder (agents, workers, and their forked
    helpers, which keep the command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        cmd = cmdline(proc.name) if proc.name.isdigit() else ""
        if f"run.output_dir={run_dir} " in cmd + " ":
            found.append(cmd)
    return found


def blocks(pid: int, sig: int) -> bool:
    """Whether the process's main thread holds `sig` blocked (SigBlk in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)
