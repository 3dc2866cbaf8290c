#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for Troupe, builds it, and runs the main job on its
# embedded default. Idempotent: a second run only rebuilds what changed.
#   scripts/setup.sh            install dependencies, fetch reference data, build, run the demo
#   TROUPE_SKIP_DEMO=1 ...      everything but the demo run
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(build-essential cmake ninja-build pkg-config
          libcaf-dev libboost-dev libsimdjson-dev libgtest-dev libopenblas-dev libpcre2-dev libcli11-dev
          python3-torch python3-numpy curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v npm >/dev/null || { echo "[setup] node and npm are required (Debian: apt-get install nodejs npm)"; exit 1; }
scripts/fetch-data.sh

echo "[setup] building (build/, Ninja, Release)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build

if [ "${TROUPE_SKIP_DEMO:-0}" != 1 ]; then
  scripts/demo.sh
fi
