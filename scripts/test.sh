#!/usr/bin/env bash
# Runs the whole test suite on the build that scripts/setup.sh made: unit tests, the PyTorch
# and tokenizer reference checks, the CLI checks (and the CUDA kernel tests, which skip without
# a GPU); then the unit, graph, gateway and CLI tests again under AddressSanitizer + UndefinedBehaviorSanitizer
# in build-asan/ (TROUPE_SKIP_SANITIZERS=1 skips that). Extra arguments go to the first ctest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -f build/build.ninja ] || { echo "no build/: run scripts/setup.sh first"; exit 1; }
cmake --build build
ctest --test-dir build --output-on-failure -j2 "$@"
if [ "${TROUPE_SKIP_SANITIZERS:-0}" != 1 ]; then
  echo "[test] unit and CLI tests under ASan + UBSan (build-asan/)"
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTROUPE_SANITIZE=ON -DTROUPE_CUDA=OFF >/dev/null
  cmake --build build-asan --target troupe troupe_tests troupe_graph_tests troupe_gateway_tests
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ctest --test-dir build-asan --output-on-failure -j2 -L "unit|cli|graph|gateway"
fi
