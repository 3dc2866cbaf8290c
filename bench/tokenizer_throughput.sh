#!/usr/bin/env bash
# Encoding throughput (MB/s, one thread) of Troupe's tokenizer against tiktoken (OpenAI's Rust
# BPE compiled to WASM, npm tiktoken 1.0.22) on the same text and rank files, in one run.
# Both sides time only the encode call on text already in memory, after a warm-up.
#   bench/tokenizer_throughput.sh [CORPUS_FILE]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
corpus=${1:-$root/.deps/corpora/python-docs.txt}
export NODE_PATH=$root/.deps/npm/node_modules
text=$(mktemp)
/usr/bin/python3 -c "open('$text', 'w', encoding='utf-8').write(open('$corpus', 'rb').read().decode('utf-8', 'ignore'))"
echo "# $(date -u +%F) $(git -C "$root" rev-parse --short HEAD); $(basename "$corpus"), $(du -m "$text" | cut -f1) MB"
printf "%-12s %-16s %-16s %s\n" encoding "troupe MB/s" "tiktoken MB/s" ratio
for enc in gpt2 cl100k_base o200k_base; do
  t=$("$root/build/bench/troupe_bench_tokenizer" "$NODE_PATH/tiktoken/encoders/$enc.json" "$text")
  r=$(node "$root/tests/reference/encode_reference.cjs" "bench:$enc" "$text")
  /usr/bin/python3 -c "
import json; a, b = json.loads('''$t'''), json.loads('''$r''')
assert a['tokens'] == b['tokens'], 'token counts differ'
print(f\"{'$enc':<12} {a['mb_per_s']:<16.2f} {b['mb_per_s']:<16.2f} x{a['mb_per_s'] / b['mb_per_s']:.2f}\")"
done
rm -f "$text"
