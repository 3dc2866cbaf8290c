#!/usr/bin/env bash
# Training tokens/s of `troupe train` (one stage, one replica) against the PyTorch baseline
# (bench/pytorch_train.py: the same model, batch shape and AdamW, eager float32) at 1 and 2
# threads, in one run. Steps after the first two are timed on both sides.
#   bench/train_vs_pytorch.sh [MODEL_CONFIG] [SEQUENCES] [SEQ_LEN] [STEPS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$root/configs/models/demo-target.json}
sequences=${2:-16}
seq_len=${3:-128}
steps=${4:-12}
work=$root/build/bench-train
rm -rf "$work"; mkdir -p "$work"
cat > "$work/train.json" <<JSON
{"model": "$model", "tokenizer": "$root/configs/tokenizers/troupe-bpe-4k.json",
 "data": {"paths": ["$root/.deps/corpora/kjv.txt"], "seq_len": $seq_len},
 "batch": {"sequences": $sequences, "micro_batches": 1}, "steps": $((steps + 2)),
 "optimizer": {"warmup_steps": 2}, "out": "$work/run", "eval_sequences": 1, "log_every": 1}
JSON
echo "# $(date -u +%F) $(git -C "$root" rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "# model $(basename "$model"), batch $sequences x $seq_len tokens, $steps timed steps"
printf "%-8s %-20s %-20s %s\n" threads "troupe tok/s" "pytorch tok/s" ratio
for threads in 1 2; do
  rm -rf "$work/run"
  OPENBLAS_NUM_THREADS=$threads "$root/build/troupe" train --config "$work/train.json" --quiet 2>/dev/null
  troupe=$(grep '"loss"' "$work/run/metrics.jsonl" | /usr/bin/python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
a, b = rows[1], rows[-1]
print((b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]))')
  torch=$(/usr/bin/python3 "$root/bench/pytorch_train.py" "$model" "$sequences" "$seq_len" "$steps" "$threads" |
          /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["tokens_per_s"])')
  awk -v t="$threads" -v a="$troupe" -v b="$torch" 'BEGIN {printf "%-8s %-20.0f %-20.0f %.2fx\n", t, a, b, a / b}'
done
