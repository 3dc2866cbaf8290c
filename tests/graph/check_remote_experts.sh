#!/usr/bin/env bash
# Hosts expert shard 1 of a two-stage, two-shard topology in a second troupe process on
# loopback (CAF middleman) and checks that greedy generation through that split graph gives
# token for token the text of the single-process graph and of the plain forward pass.
# Usage: check_remote_experts.sh TROUPE_EXE WORK_DIR
set -euo pipefail
troupe=$1
work=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work"; mkdir -p "$work"
"$troupe" init-model --config "$root/configs/models/demo-tiny.json" --out "$work/m" --seed 4 >/dev/null 2>&1
# The host must publish on a port the topology names; a random one can be taken by another
# test running in parallel, so a failed start retries on another port.
host=""
trap 'kill $host 2>/dev/null || true' EXIT
for attempt in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 20000))
  sed "s/127.0.0.1:4300/127.0.0.1:$port/" "$root/configs/topologies/remote-experts.json" |
    sed 's/"expert_shards": 2,/"expert_shards": 2, "scheduler": {"heartbeat_ms": 300},/' > "$work/remote.json"
  "$troupe" expert-host --model "$work/m" --topology "$work/remote.json" --shards 1 --port "$port" --threads 1 \
    2> "$work/host.log" &
  host=$!
  for _ in $(seq 100); do
    grep -q "serving" "$work/host.log" 2>/dev/null && break
    kill -0 $host 2>/dev/null || break
    sleep 0.1
  done
  grep -q "serving" "$work/host.log" && break
  echo "port $port: $(tail -1 "$work/host.log"); retrying"
done
grep -q "serving" "$work/host.log" || { cat "$work/host.log"; echo "expert host did not start"; exit 1; }
status=0
for prompt in "In the beginning" "And God said, Let there be light" "The quick brown fox"; do
  args=(--model "$work/m" --prompt "$prompt" --temperature 0 --max-tokens 24 --threads 1)
  plain=$("$troupe" generate "${args[@]}" --quiet)
  local_graph=$("$troupe" generate "${args[@]}" --topology "$root/configs/topologies/pipeline-2x2.json" 2>/dev/null)
  remote=$("$troupe" generate "${args[@]}" --topology "$work/remote.json" 2>"$work/remote.err")
  if [ "$plain" = "$local_graph" ] && [ "$plain" = "$remote" ]; then
    echo "ok   '$prompt': identical over the plain pass, the local graph and the graph with remote experts"
  else
    echo "FAIL '$prompt'"; printf 'plain:  %q\nlocal:  %q\nremote: %q\n' "$plain" "$local_graph" "$remote"; cat "$work/remote.err"
    status=1
  fi
done
# A frozen peer (SIGSTOP: its TCP connection stays open) must fail the request it holds within
# a few heartbeats, not hang until the step timeout.
"$troupe" generate --model "$work/m" --prompt "In the beginning" --temperature 0 --max-tokens 2000 --threads 1 \
  --topology "$work/remote.json" > "$work/frozen.out" 2> "$work/frozen.err" &
gen=$!
sleep 0.5
kill -STOP $host
start=$(date +%s)
if wait $gen; then
  echo "FAIL generation finished although its expert shard was frozen"; status=1
else
  took=$(( $(date +%s) - start ))
  if grep -q "does not answer heartbeats" "$work/frozen.err" && [ $took -le 10 ]; then
    echo "ok   frozen expert host: the request failed after ${took}s: $(grep -o 'finish: error.*' "$work/frozen.err" | cut -c1-160)"
  else
    echo "FAIL frozen expert host: after ${took}s: $(cat "$work/frozen.err")"; status=1
  fi
fi
kill -CONT $host
sleep 0.2
kill -TERM $host
for _ in $(seq 100); do kill -0 $host 2>/dev/null || break; sleep 0.1; done
if kill -0 $host 2>/dev/null; then
  echo "FAIL expert host still running 10 s after SIGTERM"; status=1
else
  wait $host; code=$?
  echo "ok   expert host exited on SIGTERM (status $code: $(tail -1 "$work/host.log"))"
fi
# With the host gone the remote graph cannot start: proof that the shard really ran remotely.
if "$troupe" generate --model "$work/m" --prompt "x" --max-tokens 2 --topology "$work/remote.json" 2> "$work/gone.err" >/dev/null; then
  echo "FAIL the graph started without its remote expert shard"; status=1
elif grep -q "unreachable" "$work/gone.err"; then
  echo "ok   without the host: $(cat "$work/gone.err")"
else
  echo "FAIL unexpected error: $(cat "$work/gone.err")"; status=1
fi
exit $status
