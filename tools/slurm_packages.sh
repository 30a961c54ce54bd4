#!/usr/bin/env bash
# SLURM and munge for the test suite's one-node cluster (tests/slurm_cluster.py): Debian's slurm-wlm
# daemons and client and munge, installed once when missing (root, apt). Elsewhere the SLURM tests
# are skipped, and pytest's summary says why.
set -uo pipefail
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "[env] SLURM is not installed and this is not a root Debian/Ubuntu shell: the SLURM tests will be skipped" >&2
    exit 0
fi
packages=(slurmctld slurmd slurm-client munge)
echo "[env] installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${packages[@]}" >/dev/null 2>&1; } \
    || echo "[env] could not install ${packages[*]}: the SLURM tests will be skipped" >&2
