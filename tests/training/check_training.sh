#!/usr/bin/env bash
# `troupe train` end to end on a tiny model: a resumed run repeats the uninterrupted run's
# losses bit for bit; 2 pipeline stages and 2 data-parallel replicas train the same model;
# checkpoints load in `generate`; `troupe plot` draws the runs; bad configs, a checkpoint of
# another model and a full disk while saving give clear errors and lose nothing.
# With DEVICE cuda (the GPU machine: gpu-bundle/check.sh) the stage actors train on the GPU
# (float32 GEMMs): the same checks, with losses agreeing to 1e-4 instead of bit for bit (the GPU
# sums gradients with atomics, in no fixed order), and the GPU run's losses against the CPU's.
# Usage: check_training.sh TROUPE_EXE WORK_DIR [DEVICE]
set -uo pipefail
troupe=$1
work=$2
device=${3:-cpu}
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work"; mkdir -p "$work"
cd "$work"
failures=0
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; failures=$((failures + 1)); }
expect_error() {  # NAME PATTERN CMD...: exit status 2 and stderr matching PATTERN
  local name=$1 pattern=$2; shift 2
  local err status
  err=$("$@" 2>&1 >/dev/null); status=$?
  if [ $status -eq 2 ] && grep -qE "$pattern" <<<"$err"; then pass "$name"; else fail "$name (exit $status: $err)"; fi
}
losses() { grep '"loss"' "$1" | sed 's/,"learning_rate".*//'; }

corpus=${TROUPE_CORPUS:-$root/.deps/corpora/kjv.txt}  # the GPU machine has no .deps: gpu-bundle brings a copy
[ -f "$corpus" ] || { echo "no $corpus: run scripts/fetch-data.sh"; exit 1; }
head -c 150000 "$corpus" > corpus.txt
sed 's/"hidden_size": 256/"hidden_size": 64/; s/"ffn_hidden_size": 512/"ffn_hidden_size": 96/; s/"expert_ffn_hidden_size": 128/"expert_ffn_hidden_size": 32/; s/"q_lora_rank": 128/"q_lora_rank": 32/; s/"kv_lora_rank": 64/"kv_lora_rank": 32/' \
  "$root/configs/models/demo-target.json" > model.json
config() {  # NAME STAGES REPLICAS [extra top-level fields]
  cat > "$1.json" <<JSON
{"model": "model.json", "tokenizer": "$root/configs/tokenizers/troupe-bpe-4k.json",
 "data": {"paths": ["corpus.txt"], "seq_len": 32, "validation_fraction": 0.05},
 "batch": {"sequences": 4, "micro_batches": 2}, "pipeline": {"stages": $2, "replicas": $3},
 "steps": 8, "seed": 3, "optimizer": {"learning_rate": 0.01, "warmup_steps": 2},
 "out": "$1", "checkpoint_every": 4, "eval_every": 4, "eval_sequences": 4, "log_every": 1,
 "device": "$device", "gemm_math": "f32" ${4:-}}
JSON
}
close() {  # A B [TOL]: the same 8 steps, losses agreeing to TOL relative (1e-5)
  [ "$(losses "$1" | wc -l)" -eq 8 ] && [ "$(losses "$2" | wc -l)" -eq 8 ] || return 1
  paste <(losses "$1" | sed 's/.*"loss"://') <(losses "$2" | sed 's/.*"loss"://') |
    awk -v tol="${3:-1e-5}" '{d = $1 - $2; if (d < 0) d = -d; if (d > tol * $2) bad = 1} END {exit bad}'
}

config full 1 1
config resumed 1 1
config staged 2 1
config parallel 1 2
"$troupe" train --config full.json --quiet 2>train.log && pass "train" || { cat train.log; fail "train"; }
"$troupe" train --config resumed.json --quiet --steps 4 2>/dev/null && "$troupe" train --config resumed.json --quiet --resume 2>resume.log
if [ "$device" != cpu ]; then
  close full/metrics.jsonl resumed/metrics.jsonl 1e-4 && pass "a resumed run on $device repeats the uninterrupted losses (1e-4)" ||
    fail "resume on $device: $(paste <(losses full/metrics.jsonl) <(losses resumed/metrics.jsonl))"
  config reference 1 1 ', "device": "cpu"'; sed -i 's/"device": "cuda[:0-9]*", //' reference.json
  "$troupe" train --config reference.json --quiet 2>/dev/null
  close full/metrics.jsonl reference/metrics.jsonl 1e-3 && pass "training on $device gives the CPU's losses (1e-3)" ||
    fail "$device vs cpu: $(paste <(losses full/metrics.jsonl) <(losses reference/metrics.jsonl))"
elif [ "$(losses full/metrics.jsonl)" == "$(losses resumed/metrics.jsonl)" ] && [ "$(losses full/metrics.jsonl | wc -l)" -eq 8 ]; then
  pass "a resumed run repeats the uninterrupted losses bit for bit"
  cmp -s full/checkpoints/step-000008/trainer_state.safetensors resumed/checkpoints/step-000008/trainer_state.safetensors &&
    pass "and ends with identical weights and moments" || fail "resumed weights differ"
else
  fail "resume: $(diff <(losses full/metrics.jsonl) <(losses resumed/metrics.jsonl))"
fi

"$troupe" train --config staged.json --quiet 2>/dev/null && "$troupe" train --config parallel.json --quiet 2>parallel.log
tol=1e-5; [ "$device" != cpu ] && tol=1e-4
close full/metrics.jsonl staged/metrics.jsonl $tol && pass "2 pipeline stages give the 1-stage losses" || fail "2 stages differ"
close full/metrics.jsonl parallel/metrics.jsonl $tol && pass "2 data-parallel replicas give the 1-replica losses" || fail "2 replicas differ"
if [ "$device" == cuda ] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # replicas on two GPUs: NCCL
  grep -q "all-reduce their gradients on the GPUs (NCCL)" parallel.log && pass "and on two GPUs they all-reduce over NCCL" ||
    fail "no NCCL all-reduce on two GPUs: $(cat parallel.log)"
fi
first=$(losses full/metrics.jsonl | head -1 | sed 's/.*"loss"://'); last=$(losses full/metrics.jsonl | tail -1 | sed 's/.*"loss"://')
[ -n "$first" ] && [ -n "$last" ] && awk -v a="$first" -v b="$last" 'BEGIN {exit !(b + 0.5 < a)}' && pass "the loss falls ($first -> $last)" || fail "loss $first -> $last"
grep -q validation_loss full/metrics.jsonl && pass "validation loss logged" || fail "no validation loss"

out=$("$troupe" generate --device "$device" --model full/checkpoints/step-000008 --prompt "And God said" --max-tokens 8 2>/dev/null)
[ $? -eq 0 ] && pass "generate loads the checkpoint" || fail "generate on the checkpoint"
"$troupe" plot full staged --out loss.svg 2>/dev/null && grep -q "<svg" loss.svg && grep -q "full (train)" loss.svg &&
  pass "plot draws the runs" || fail "plot"

# Bad input.
config nocorpus 1 1; sed -i 's/"corpus.txt"/"missing.txt"/' nocorpus.json
expect_error "a missing corpus" "missing.txt does not exist" "$troupe" train --config nocorpus.json
: > empty.txt; config empty 1 1; sed -i 's/"corpus.txt"/"empty.txt"/' empty.json
expect_error "an empty corpus" "is empty" "$troupe" train --config empty.json
config typo 1 1 ', "learning_rate": 1'
expect_error "an unknown field" "unknown field 'learning_rate'" "$troupe" train --config typo.json
config uneven 1 1; sed -i 's/"micro_batches": 2/"micro_batches": 3/' uneven.json
expect_error "a batch that does not split" "multiple of" "$troupe" train --config uneven.json
echo '{"model": ' > broken.json
expect_error "malformed JSON" "not valid JSON" "$troupe" train --config broken.json
config other 1 1; sed -i 's/"out": "other"/"out": "full"/; s/model.json/model2.json/' other.json
sed 's/"hidden_size": 64/"hidden_size": 48/' model.json > model2.json
expect_error "resuming with a checkpoint of another model" "config differs" "$troupe" train --config other.json --resume --steps 12
cp -r full broken && config broken 1 1
truncate -s 100 broken/checkpoints/step-000008/trainer_state.safetensors
expect_error "resuming from a truncated checkpoint" "trainer_state.safetensors" "$troupe" train --config broken.json --resume --steps 12
config nowhere 1 1
expect_error "resuming where there is no checkpoint" "has no checkpoint" "$troupe" train --config nowhere.json --resume
config baddevice 1 1; sed -i 's/"device": "[a-z:0-9]*"/"device": "tpu"/' baddevice.json
expect_error "an unknown device" 'must be "cpu", "cuda" or "cuda:N"' "$troupe" train --config baddevice.json
if [ "$device" == cpu ] && ! nvidia-smi -L >/dev/null 2>&1; then
  expect_error "training on a GPU where there is none" "no CUDA device is visible|has no CUDA stage" \
    "$troupe" train --config nowhere.json --device cuda
fi

# A full disk while saving: the save fails clearly, the previous checkpoint stays the latest and loads.
err=$(ulimit -f 1500; "$troupe" train --config full.json --resume --steps 12 --quiet 2>&1 >/dev/null); status=$?
if [ $status -ne 0 ] && grep -q "saving checkpoint .* failed" <<<"$err" && grep -q "step-000008" full/latest &&
   [ ! -e full/checkpoints/step-000012.tmp ] && [ ! -e full/checkpoints/step-000012 ]; then
  pass "a full disk while saving fails clearly and keeps the previous checkpoint"
else
  fail "full disk (exit $status): $err"
fi
"$troupe" generate --model full/checkpoints/step-000008 --prompt "And" --max-tokens 4 >/dev/null 2>&1 &&
  pass "the previous checkpoint still loads" || fail "previous checkpoint broken"

echo "$failures failure(s)"
[ "$failures" -eq 0 ]
