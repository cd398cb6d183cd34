#!/usr/bin/env bash
# Reruns the numerically sensitive tests (pytest marker "numerics") under settings that make PyTorch
# and oneDNN pick other kernels, and so other float rounding: another thread count, AVX2 and SSE4.1
# instruction sets instead of the best the CPU has. Every tolerance in those tests is derived
# from the arithmetic, so all of them must pass under every setting. (Other batch compositions are
# compared inside the tests themselves.) Called by `make test`; about 1.5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/pytest -p no:cacheprovider -m numerics -q)

run() {  # name, then environment assignments
  local name=$1
  shift
  echo "numerics: $name"
  env "$@" "${PYTEST[@]}"
}

# Two reruns: with the main run, each test sees one and two threads (tests/test_explain.py defaults to one,
# the others to two) and three instruction sets.
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  run "AVX2 kernels, two threads" CXRLENS_TEST_THREADS=2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
else
  run "two threads" CXRLENS_TEST_THREADS=2
fi
run "SSE4.1 kernels, one thread" CXRLENS_TEST_THREADS=1 ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default
