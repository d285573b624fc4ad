#!/usr/bin/env bash
# The whole test suite: Python (pytest) and C++ (GoogleTest via ctest).
source "$(dirname "$0")/setup_env.sh"
cd "$TBN_ROOT"
python -m pytest -q "$@"
if [ -f scripts/test_cpp.sh ]; then
  bash scripts/test_cpp.sh
fi
