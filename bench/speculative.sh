#!/usr/bin/env bash
# Speculative decoding at batch 1 on the CPU: decode tokens/s of the demo target alone against
# the target with the demo draft proposing k = 1, 3, 5 tokens per round (greedy, so the text
# is identical and checked), and the mean acceptance length, in one run. Medians of REPEATS.
#   bench/speculative.sh [TOKENS] [REPEATS] [THREADS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tokens=${1:-200}
repeats=${2:-5}
threads=${3:-1}
troupe=$root/build/troupe
prompts=("In the beginning" "And the LORD said unto Moses" "A hacker is" "Blessed are")
echo "# $(date -u +%F) $(git -C "$root" rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads thread(s)"
echo "# models/demo with models/demo-draft, greedy, $tokens tokens per prompt, ${#prompts[@]} prompts, median of $repeats"
printf "%-10s %-14s %-12s %s\n" draft "decode tok/s" speedup "mean acceptance length"
base=""
for k in 0 1 3 5; do
  rates=(); accept=()
  for _ in $(seq "$repeats"); do
    total_tokens=0; total_s=0; acc_sum=0
    for p in "${prompts[@]}"; do
      args=(generate --model "$root/models/demo" --prompt "$p" --max-tokens "$tokens" --temperature 0 --threads "$threads")
      [ "$k" -gt 0 ] && args+=(--draft "$root/models/demo-draft" --draft-tokens "$k")
      out=$("$troupe" "${args[@]}" 2>&1 >/tmp/spec-bench-text.$$)
      if [ "$k" -eq 0 ]; then cp /tmp/spec-bench-text.$$ "/tmp/spec-bench-ref-${p// /_}.$$"
      else cmp -s /tmp/spec-bench-text.$$ "/tmp/spec-bench-ref-${p// /_}.$$" || { echo "text differs with k=$k: void"; exit 1; }; fi
      s=$(grep -o 'tokens in [0-9.e-]* s' <<<"$out" | awk '{print $3}')
      n=$(grep -o '; [0-9]* tokens in' <<<"$out" | awk '{print $2}')
      total_tokens=$((total_tokens + n)); total_s=$(awk -v a="$total_s" -v b="$s" 'BEGIN {print a + b}')
      [ "$k" -gt 0 ] && acc_sum=$(awk -v a="$acc_sum" -v b="$(grep -o 'mean acceptance length [0-9.]*' <<<"$out" | awk '{print $4}')" 'BEGIN {print a + b}')
    done
    rates+=("$(awk -v n="$total_tokens" -v s="$total_s" 'BEGIN {print n / s}')")
    accept+=("$(awk -v a="$acc_sum" -v c="${#prompts[@]}" 'BEGIN {print a / c}')")
  done
  median() { printf "%s\n" "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
  rate=$(median "${rates[@]}"); acc=$(median "${accept[@]}")
  base=${base:-$rate}
  awk -v k="$k" -v r="$rate" -v b="$base" -v a="$acc" 'BEGIN {printf "%-10s %-14.0f %-12s %s\n", (k ? "k=" k : "none"), r, sprintf("%.2fx", r / b), (k ? a : "-")}'
done
rm -f /tmp/spec-bench-*.$$
