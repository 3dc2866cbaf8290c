#!/usr/bin/env bash
# Sustained load on the gateway with wrk (Debian package `wrk`): POST /v1/completions with one
# generated token per request, 2 threads, increasing connection counts, 10 s each; reports
# requests/s and errors. Then holds many idle WebSocket-capable connections open (plain TCP
# connects) to find the connection limit.
#   bench/gateway_load.sh [MODEL_DIR]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$root/models/demo}
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)"; exit 1; }
port=$((20000 + RANDOM % 20000))
"$root/build/troupe" serve --model "$model" --port "$port" --max-connections 2048 --max-requests 4096 2> /tmp/troupe-load.log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
lua=$(mktemp --suffix .lua)
cat > "$lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"prompt": "In the beginning", "max_tokens": 1, "temperature": 0}'
wrk.headers["Content-Type"] = "application/json"
LUA
echo "# $(date -u +%F) $(git -C "$root" rev-parse --short HEAD), wrk $(wrk -v 2>&1 | head -1 | cut -d' ' -f2), $(nproc) cores, model $(basename "$model")"
ulimit -n 8192 2>/dev/null || true
for c in 8 64 256 1024 2000; do
  out=$(wrk -t2 -c$c -d10s -s "$lua" "http://127.0.0.1:$port/v1/completions" 2>&1)
  rps=$(grep "Requests/sec" <<<"$out" | awk '{print $2}')
  lat=$(grep -m1 "Latency" <<<"$out" | awk '{print $2}')
  errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr '\n' ' ')
  echo "connections $c: $rps requests/s, mean latency $lat ${errs:-no errors}"
done
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^troupe_requests_total\{outcome="(length|rejected|error)"\}'
rm -f "$lua"
