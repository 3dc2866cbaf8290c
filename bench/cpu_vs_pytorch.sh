#!/usr/bin/env bash
# Prefill and batch-1 decode tokens/s of Troupe's CPU backend against the PyTorch baseline
# (bench/pytorch_decoder.py) on the same weights, prompt and thread count, in one run.
# Both greedy-decode the same prompt; the run is refused unless they produce the same tokens.
# Each side runs REPEATS times, alternating; medians are reported with their ratio.
#   bench/cpu_vs_pytorch.sh [CONFIG] [PROMPT_TOKENS] [DECODE_TOKENS] [REPEATS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
config=${1:-$root/bench/configs/cpu-medium.json}
prompt=${2:-256}
decode=${3:-64}
repeats=${4:-3}
model=$root/build/bench-models/$(basename "$config" .json)
[ -f "$model/config.json" ] || "$root/build/troupe" init-model --config "$config" --out "$model" --seed 1 --tokenizer "" >/dev/null
echo "# $(date -u +%F) $(git -C "$root" rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "# model $(basename "$config"): $(du -sh "$model" | cut -f1) bf16 on disk; prompt $prompt, decode $decode tokens"
printf "%-8s %-22s %-22s %-22s %-22s\n" threads "troupe prefill tok/s" "pytorch prefill tok/s" "troupe decode tok/s" "pytorch decode tok/s"
for threads in 1 2; do
  rm -f /tmp/troupe-bench.$$ /tmp/torch-bench.$$
  for _ in $(seq "$repeats"); do
    "$root/build/bench/troupe_bench_model" "$model" "$prompt" "$decode" "$threads" >> /tmp/troupe-bench.$$
    /usr/bin/python3 "$root/bench/pytorch_decoder.py" "$model" "$prompt" "$decode" "$threads" >> /tmp/torch-bench.$$
  done
  /usr/bin/python3 - "$threads" /tmp/troupe-bench.$$ /tmp/torch-bench.$$ <<'PY'
import json, statistics, sys
threads, a, b = sys.argv[1], [json.loads(l) for l in open(sys.argv[2])], [json.loads(l) for l in open(sys.argv[3])]
if any(r["tokens"] != b[0]["tokens"] for r in a + b):
    sys.exit("greedy tokens differ between Troupe and PyTorch: the comparison is void")
med = lambda rs, k: statistics.median(r[k] for r in rs)
tp, pp, td, pd = med(a, "prefill_tok_s"), med(b, "prefill_tok_s"), med(a, "decode_tok_s"), med(b, "decode_tok_s")
print(f"{threads:<8} {tp:<22.1f} {pp:<22.1f} {td:<22.1f} {pd:<22.1f}  prefill x{tp/pp:.2f}, decode x{td/pd:.2f}")
PY
done
rm -f /tmp/troupe-bench.$$ /tmp/torch-bench.$$
