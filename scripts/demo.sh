#!/usr/bin/env bash
# The main job on its embedded default: makes sure the default model exists (models/demo),
# then generates from a prompt with it, streaming the text.
# Until the training pipeline ships trained demo weights, the default model has random weights
# in the real layout (configs/models/demo-tiny.json), so the text is not meaningful yet.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
troupe=build/troupe
if [ ! -f models/demo/config.json ]; then
  "$troupe" init-model --config configs/models/demo-tiny.json --out models/demo --seed 0
fi
"$troupe" generate --model models/demo --prompt "In the beginning" --max-tokens 48 --temperature 0.8 --seed 1
