#!/usr/bin/env bash
# `troupe serve` as an operator runs it: it answers, and on SIGTERM it stops accepting new
# connections, lets the request in flight finish (its stream ends with [DONE]) and exits.
# Usage: check_serve.sh TROUPE_EXE WORK_DIR
set -uo pipefail
troupe=$1
work=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work"; mkdir -p "$work"
"$troupe" init-model --config "$root/configs/models/demo-tiny.json" --out "$work/m" --seed 2 >/dev/null 2>&1
# Port 0: the server binds any free port and names it in its log (a fixed or random port can
# collide with other tests running in parallel).
listening_port() {
  for _ in $(seq 100); do
    p=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$1" 2>/dev/null | grep -o '[0-9]*$')
    [ -n "$p" ] && { echo "$p"; return; }
    sleep 0.1
  done
}
"$troupe" serve --model "$work/m" --port 0 --threads 1 --shutdown-grace 20 2> "$work/serve.log" &
server=$!
trap 'kill -9 $server 2>/dev/null || true' EXIT
port=$(listening_port "$work/serve.log")
status=0
ok() { echo "ok   $1"; }
fail() { echo "FAIL $1"; status=1; }
[ "$(curl -s "http://127.0.0.1:$port/health")" = '{"status":"ok"}' ] && ok "health" || fail "health"
# A long streamed request, then SIGTERM while it runs.
curl -sN "http://127.0.0.1:$port/v1/completions" \
  -d '{"prompt": "In the beginning", "max_tokens": 1500, "temperature": 0.7, "seed": 3, "stream": true}' > "$work/stream.txt" &
client=$!
for _ in $(seq 100); do [ -s "$work/stream.txt" ] && break; sleep 0.05; done
kill -TERM $server
sleep 0.3
if curl -s -m 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1; then fail "new connections are refused after SIGTERM"; else ok "new connections are refused after SIGTERM"; fi
wait $client
tail -c 200 "$work/stream.txt" | grep -q "data: \[DONE\]" && ok "the request in flight finished ($(grep -c '^data: {' "$work/stream.txt") events)" \
  || fail "the request in flight was cut off"
for _ in $(seq 200); do kill -0 $server 2>/dev/null || break; sleep 0.1; done
if kill -0 $server 2>/dev/null; then fail "the server did not exit"; else ok "the server exited: $(tail -1 "$work/serve.log")"; fi
# API keys from the environment: every endpoint but /health needs one.
TROUPE_API_KEYS="k1,k2" "$troupe" serve --model "$work/m" --port 0 --threads 1 2> "$work/keys.log" &
keyed=$!
port2=$(listening_port "$work/keys.log")
no_key=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port2/v1/models")
with_key=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer k2" "http://127.0.0.1:$port2/v1/models")
[ "$no_key" = 401 ] && [ "$with_key" = 200 ] && ok "TROUPE_API_KEYS guards the API (401 without, 200 with a key)" \
  || fail "API keys: $no_key without, $with_key with"
kill -TERM $keyed; wait $keyed
exit $status
