#!/usr/bin/env bash
# Pipeline efficiency of `troupe train`: tokens/s with 2 and 4 pipeline stages against 1 on a
# 4-block model, and each run's bubble fraction (1 - mean stage busy time / step time), in one
# run. Each stage is an actor; on a machine with fewer cores than stages the stages share them.
#   bench/pipeline_efficiency.sh [STEPS] [MICRO_BATCHES]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
steps=${1:-8}
micro=${2:-8}
work=$root/build/bench-pipeline
rm -rf "$work"; mkdir -p "$work"
sed 's/"num_layers": 2/"num_layers": 4/; s/"num_hidden_layers": 4/"num_hidden_layers": 8/' \
  "$root/configs/models/demo-target.json" > "$work/model.json"
echo "# $(date -u +%F) $(git -C "$root" rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "# 4-block demo-target shape, batch 16 x 128 tokens in $micro micro-batches, $steps steps, OPENBLAS_NUM_THREADS=1"
printf "%-8s %-12s %-14s %s\n" stages "tok/s" "vs 1 stage" "bubble"
base=""
for stages in 1 2 4; do
  cat > "$work/train-$stages.json" <<JSON
{"model": "model.json", "tokenizer": "$root/configs/tokenizers/troupe-bpe-4k.json",
 "data": {"paths": ["$root/.deps/corpora/kjv.txt"], "seq_len": 128},
 "batch": {"sequences": 16, "micro_batches": $micro}, "pipeline": {"stages": $stages}, "steps": $steps,
 "out": "run-$stages", "eval_sequences": 1, "log_every": 1}
JSON
  line=$(OPENBLAS_NUM_THREADS=1 "$root/build/troupe" train --config "$work/train-$stages.json" --quiet 2>&1 | grep "tokens/s")
  tps=$(sed 's/.*: \([0-9]*\) tokens\/s.*/\1/' <<<"$line")
  bubble=$(sed 's/.*pipeline bubble \([0-9.]*%\).*/\1/' <<<"$line")
  base=${base:-$tps}
  awk -v s="$stages" -v t="$tps" -v b="$base" -v u="$bubble" 'BEGIN {printf "%-8s %-12s %-14s %s\n", s, t, sprintf("%.2fx", t / b), u}'
done
