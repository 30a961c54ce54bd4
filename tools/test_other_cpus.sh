#!/usr/bin/env bash
# The test suite as a CPU without AVX-512 would run it, with one thread: oneDNN, MKL and torch's own
# kernels held to AVX2 (other GEMM blockings and reduction orders than on an AVX-512 machine). A test
# that passes here and under `bash tools/test.sh` asserts nothing that floating-point rounding
# decides. About as long as the suite itself; arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1
exec bash "$ROOT/tools/test.sh" "$@"
