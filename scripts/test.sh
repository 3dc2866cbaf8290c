#!/usr/bin/env bash
# Runs the whole test suite (unit tests, PyTorch and tokenizer reference checks, CLI checks)
# on the build that scripts/setup.sh made. Extra arguments go to ctest (e.g. -L unit).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -f build/build.ninja ] || { echo "no build/: run scripts/setup.sh first"; exit 1; }
cmake --build build
ctest --test-dir build --output-on-failure -j2 "$@"
