#!/usr/bin/env bash
# The whole test suite: Python (pytest) and C++ (GoogleTest via ctest).
source "$(dirname "$0")/setup_env.sh"
cd "$TBN_ROOT"
python -m pytest -q "$@"
if [ -f scripts/test_cpp.sh ]; then
  bash scripts/test_cpp.sh
fi
# The CPU loops are built once per instruction set and picked at run time, so the suites
# above run only this machine's copy (tbn_test_loops alone checks every copy the CPU
# runs). The parity, stability and property tests run again on the AVX2 copy (where the
# CPU has AVX2) and on the baseline one, picked as torch picks its kernels. Only for the
# whole suite: arguments select tests of the first pass.
if [ $# -eq 0 ]; then
  capabilities=(default)
  grep -qw avx2 /proc/cpuinfo 2>/dev/null && capabilities=(avx2 default)
  for capability in "${capabilities[@]}"; do
    echo "[test] CPU loops picked for ATEN_CPU_CAPABILITY=$capability"
    export ATEN_CPU_CAPABILITY="$capability"
    python -m pytest -q -p no:cacheprovider \
      tests/python/test_parity.py tests/python/test_stability.py tests/python/test_hypothesis.py
  done
  unset ATEN_CPU_CAPABILITY
fi
