#!/usr/bin/env bash
# Reproduces the issue's collision table on the real corpus: GPT-2 tokens of the KJV, the
# Jargon File, fortunes and the Python docs (~9.9M tokens, ~920k distinct bigrams), for
# bigram tables of 78V, 78V+1, 78V+3, 78V+23, 78V+502 and 16.5V. Every measured share must be
# within 0.005 of the table, and every recommended size (orders 2 and 3) within 5% of the
# random-hash share. Also checks that --plot writes an SVG.
# Usage: check_ngram_plan.sh TROUPE_EXE WORK_DIR
set -euo pipefail
troupe=$1
work=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
c=$root/.deps/corpora
[ -f "$c/.done" ] || { echo "corpora missing: run scripts/fetch-data.sh"; exit 1; }
rm -rf "$work"; mkdir -p "$work"
"$troupe" ngram-plan --tokenizer "$root/.deps/npm/node_modules/tiktoken/encoders/gpt2.json" \
  --corpus "$c/kjv.txt" "$c/jargon.txt" "$c/fortunes.txt" "$c/python-docs.txt" \
  --orders 3 --splits 2 --vocab-ratio 78 --eval 78V 78V+1 78V+3 78V+23 78V+502 16.5V \
  --plot "$work/collisions.svg" > "$work/plan.txt"
cat "$work/plan.txt"
/usr/bin/python3 - "$work/plan.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
expected = {"78V": (0.524, 0.108), "78V+1": (0.358, 0.108), "78V+3": (0.316, 0.108),
            "78V+23": (0.193, 0.108), "78V+502": (0.108, 0.108), "16.5V": (0.567, 0.395)}
ok = True
for size, (share, rnd) in expected.items():
    m = re.search(r"M = %s\s.*order 2: collision share ([0-9.]+), random hash ([0-9.]+)" % re.escape(size), text)
    got = (float(m.group(1)), float(m.group(2))) if m else None
    good = got is not None and abs(got[0] - share) <= 0.005 and abs(got[1] - rnd) <= 0.005
    ok &= good
    print(f"{size:>8}: measured {got}, table ({share}, {rnd}) -> {'ok' if good else 'FAIL'}")
rows = re.findall(r"^\d+\s+(\d)\s+\d\s+\|.*\|\s+(\d+) \S+ \S+\s+([0-9.]+)\s+([0-9.]+)\s*$", text, re.M)
if len(rows) != 4:
    print("expected 4 recommended sizes, found", len(rows)); ok = False
sizes = set()
for order, size, share, rnd in rows:
    good = float(share) <= 1.05 * float(rnd)
    ok &= good
    sizes.add(size)
    print(f"order {order}: recommended {size}: share {share} vs random {rnd} -> {'ok' if good else 'FAIL'}")
ok &= len(sizes) == len(rows)
sys.exit(0 if ok else 1)
PY
grep -q "<svg" "$work/collisions.svg"
