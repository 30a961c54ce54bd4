"""Launch scripts: the slurm script's dry run with faked SLURM_* variables, and the torchrun wrapper."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_slurm_dry_run_prints_the_exact_commands(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "DRY_RUN": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "uptrain_gemma.sh"), "optim.lr=2e-4"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "nodes=2 gpus_per_node=8 master=gpu-node-07:24242"
    cmd = lines[1]
    for part in ["srun --ntasks-per-node=1", "torchrun --nnodes=2 --nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=gpu-node-07:24242", "--rdzv-id=4242", "-m relaxrec_megatron.cli.main train",
                 "configs/gemma-2b-relaxed.yaml", "checkpoint.resume=auto", "optim.lr=2e-4"]:
        assert part in cmd, part


def test_slurm_script_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "uptrain_gemma.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "not inside a SLURM job" in out.stderr


def test_torchrun_wrapper_multi_node_from_env():
    env = {**os.environ, "DRY_RUN": "1", "NNODES": "4", "NODE_RANK": "2", "NPROC_PER_NODE": "8",
           "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}
    out = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), str(ROOT / "configs" / "tiny-cpu.yaml"),
                          "optim.train_steps=5"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for part in ["--nnodes=4", "--nproc-per-node=8", "--node-rank=2", "--rdzv-endpoint=10.1.2.3:29400",
                 "train --config", "tiny-cpu.yaml", "optim.train_steps=5"]:
        assert part in out.stdout, part
    bad = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "/nonexistent.yaml"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "no such config" in bad.stderr
