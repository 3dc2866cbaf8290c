#!/usr/bin/env bash
# Speculative decoding with a Lite-shaped target on one GPU, end to end (run from the repository
# root on the GPU machine; several minutes of an H100):
#   1. the target: configs/models/lite-1b.json (1.83B) trained briefly on the demo corpora
#      (configs/train/lite-1b-spec-target.json);
#   2. a distillation set: its greedy continuations of 16-token spans of the same text
#      (`troupe distill`, batches of 64);
#   3. the draft: configs/models/lite-1b-draft.json (plain embeddings) trained on that set
#      (configs/train/lite-1b-draft.json);
#   4. troupe_bench_speculative at batch 1, 8 and 32 for each K: plain batched decoding against
#      speculation (adaptive and always on), mean acceptance length, and the cost of one target
#      step, one verification and one draft step; then `troupe generate` (the CLI's path) with and
#      without the draft at the last K.
# Steps whose output exists are skipped, so a second call continues where the first stopped.
#   bench/speculative_gpu.sh [TOKENS] [K...]
# Environment: TROUPE (the CLI; default build/troupe), BENCH (default
# build/bench/troupe_bench_speculative), DEVICE (default cuda), PROMPTS (default 16384).
set -euo pipefail
tokens=${1:-128}; shift || true
ks=("$@"); [ ${#ks[@]} -gt 0 ] || ks=(3)
troupe=${TROUPE:-build/troupe}
bench=${BENCH:-build/bench/troupe_bench_speculative}
device=${DEVICE:-cuda}
prompts=${PROMPTS:-16384}
target=runs/lite-1b-spec-target/checkpoints/step-000400
draft=runs/lite-1b-draft/checkpoints/step-002000
log() { echo "[speculative_gpu $(date -u +%T)] $*"; }

if [ ! -f "$target/config.json" ]; then
  log "training the target ($(grep -o '"steps": [0-9]*' configs/train/lite-1b-spec-target.json))"
  $troupe train --config configs/train/lite-1b-spec-target.json --device "$device" --quiet
fi
if [ ! -f runs/lite-1b-distill.npy ]; then
  log "distilling: $prompts prompts"
  $troupe distill --model "$target" --data .deps/corpora/kjv.txt .deps/corpora/jargon.txt .deps/corpora/fortunes.txt \
    --out runs/lite-1b-distill.npy --prompts "$prompts" --max-tokens 128 --batch 64 --device "$device" --tables device
fi
if [ ! -f "$draft/config.json" ]; then
  log "training the draft"
  $troupe train --config configs/train/lite-1b-draft.json --device "$device" --quiet
fi
log "sample: $($troupe generate --model "$target" --device "$device" --tables device --prompt "And the LORD said unto Moses" \
  --max-tokens 48 --temperature 0 --quiet | tr '\n' ' ')"
for k in "${ks[@]}"; do
  log "k=$k, $tokens tokens per sequence"
  $bench "$target" "$draft" --tokens "$tokens" --k "$k" --device "$device" --tables device
done
prompt="And it came to pass"
for draft_args in "" "--draft $draft --draft-tokens ${ks[-1]} --draft-retry-after 0"; do
  # shellcheck disable=SC2086
  log "troupe generate ${draft_args:-(no draft)}: $($troupe generate --model "$target" --device "$device" --tables device \
    --prompt "$prompt" --max-tokens 256 --temperature 0 $draft_args 2>&1 >/dev/null | grep -E 'tok/s|speculation:' | tr '\n' ' ')"
done
