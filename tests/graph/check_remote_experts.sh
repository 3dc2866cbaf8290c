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
port=$((20000 + RANDOM % 20000))
sed "s/127.0.0.1:4300/127.0.0.1:$port/" "$root/configs/topologies/remote-experts.json" > "$work/remote.json"
"$troupe" expert-host --model "$work/m" --topology "$work/remote.json" --shards 1 --port "$port" --threads 1 \
  2> "$work/host.log" &
host=$!
trap 'kill $host 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "serving" "$work/host.log" 2>/dev/null && break; sleep 0.1; done
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
kill -TERM $host
wait $host || true
grep -q "stopped" "$work/host.log" && echo "ok   expert host stopped on SIGTERM" || { echo "FAIL expert host did not stop cleanly"; status=1; }
# With the host gone the remote graph cannot start: proof that the shard really ran remotely.
if "$troupe" generate --model "$work/m" --prompt "x" --max-tokens 2 --topology "$work/remote.json" 2> "$work/gone.err" >/dev/null; then
  echo "FAIL the graph started without its remote expert shard"; status=1
elif grep -q "unreachable" "$work/gone.err"; then
  echo "ok   without the host: $(cat "$work/gone.err")"
else
  echo "FAIL unexpected error: $(cat "$work/gone.err")"; status=1
fi
exit $status
