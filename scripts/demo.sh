#!/usr/bin/env bash
# The main job on its embedded default: serves the committed demo model (models/demo, trained
# by `troupe train`, see models/demo/MODEL_CARD.md) with the actor graph behind the gateway on
# 127.0.0.1, talks to it over HTTP the way a client would, and stops it again.
# `build/troupe serve` alone keeps serving.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
troupe=build/troupe
[ -f models/demo/model.safetensors ] || { echo "[demo] models/demo is missing (it is part of the repository)"; exit 1; }
port=${TROUPE_DEMO_PORT:-18473}
"$troupe" serve --model models/demo --port "$port" > /tmp/troupe-demo-serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
cat /tmp/troupe-demo-serve.log
echo "[demo] POST /v1/completions:"
curl -s "http://127.0.0.1:$port/v1/completions" \
  -d '{"prompt": "In the beginning", "max_tokens": 32, "temperature": 0.8, "seed": 1}'
echo
echo "[demo] the same streamed (server-sent events), first events:"
curl -sN "http://127.0.0.1:$port/v1/chat/completions" \
  -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": true}' | head -4 || true
echo "[demo] to keep serving: $troupe serve; then talk with curl as above or: $troupe chat"
kill -TERM $server
wait $server || true
