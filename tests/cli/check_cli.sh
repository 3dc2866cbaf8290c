#!/usr/bin/env bash
# The CLI as a user meets it: help texts, the happy paths, and every kind of bad input giving
# exit code 2 and a message that names the problem (never a crash or a silent default).
# Usage: check_cli.sh TROUPE_EXE WORK_DIR
set -uo pipefail
troupe=$1
work=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work"; mkdir -p "$work"
failures=0
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; failures=$((failures + 1)); }

# expect_error NAME PATTERN CMD...: exit status 2 and stderr matching PATTERN.
expect_error() {
  local name=$1 pattern=$2; shift 2
  local err status
  err=$("$@" 2>&1 >/dev/null); status=$?
  if [ $status -eq 2 ] && grep -qE "$pattern" <<<"$err"; then pass "$name"; else fail "$name (exit $status: $err)"; fi
}

# Help.
for sub in "" init-model generate logits tokenize detokenize train-tokenizer ngram-plan train plot distill; do
  if "$troupe" $sub --help >/dev/null 2>&1; then pass "help $sub"; else fail "help $sub"; fi
done
if grep -q "A subcommand is required" <<<"$("$troupe" 2>&1)"; then pass "no subcommand explains"; else fail "no subcommand"; fi

tok=$root/configs/tokenizers/troupe-bpe-4k.json
cfg=$root/configs/models/demo-tiny.json
"$troupe" init-model --config "$cfg" --out "$work/m" --seed 3 >/dev/null 2>&1 && pass "init-model" || fail "init-model"
[ -f "$work/m/tokenizer.json" ] && pass "init-model writes the default tokenizer" || fail "tokenizer.json missing"

# Tokenize round trip, and the JSON contract.
text=$'Let there be light: caf\xc3\xa9 \xe2\x82\xac 42!\n'
ids=$(printf '%s' "$text" | "$troupe" tokenize --tokenizer "$tok")
[[ $ids == \[*\] ]] && pass "tokenize prints one JSON array" || fail "tokenize output: $ids"
back=$(printf '%s' "$ids" | "$troupe" detokenize --tokenizer "$tok"; printf x)
[ "${back%x}" = "$text" ] && pass "detokenize inverts tokenize" || fail "round trip"
[ "$(printf '<|eos|>' | "$troupe" tokenize --tokenizer "$tok" --special)" = "[2]" ] && pass "--special parses specials" || fail "--special"
[ "$(printf '<|eos|>' | "$troupe" tokenize --tokenizer "$tok")" != "[2]" ] && pass "specials are text by default" || fail "specials default"

# Generate and logits.
out=$("$troupe" generate --model "$work/m" --prompt "Hello" --max-tokens 5 --temperature 0 --quiet 2>&1) && pass "generate" || fail "generate: $out"
echo '[1, 5, 9, 2, 7]' > "$work/ids.json"
"$troupe" logits --model "$work/m" --ids "$work/ids.json" --out "$work/l.npy" && pass "logits" || fail "logits"
/usr/bin/python3 -c "import numpy as np; a = np.load('$work/l.npy'); assert a.shape == (5, 4096) and a.dtype == np.float32" \
  && pass "logits .npy is [tokens, vocab] float32" || fail "npy shape"

# Bad input.
echo '{"architectures": ["LongcatFlashNgramForCausalLM"], ' > "$work/bad.json"
expect_error "malformed config JSON" "bad.json: not valid JSON" "$troupe" init-model --config "$work/bad.json" --out "$work/x"
sed 's/"kv_lora_rank": 64,//' "$cfg" > "$work/missing.json"
expect_error "missing config field" "'kv_lora_rank' is missing" "$troupe" init-model --config "$work/missing.json" --out "$work/x"
expect_error "unknown architecture" "architectures" "$troupe" init-model --config <(sed 's/LongcatFlashNgramForCausalLM/GPT2LMHeadModel/' "$cfg") --out "$work/x"
cp -r "$work/m" "$work/trunc"
truncate -s -100 "$work/trunc/model.safetensors"
expect_error "truncated checkpoint" "model.safetensors: truncated: tensor '" "$troupe" logits --model "$work/trunc" --ids "$work/ids.json" --out "$work/x.npy"
cp -r "$work/m" "$work/shape"
sed -i -E 's/"ffn_hidden_size": *512/"ffn_hidden_size": 500/' "$work/shape/config.json"
expect_error "checkpoint of another shape" "mlps.0.gate_proj.weight' has shape \[512, 256\], expected \[500, 256\]" \
  "$troupe" logits --model "$work/shape" --ids "$work/ids.json" --out "$work/x.npy"
mkdir -p "$work/empty" && cp "$work/m/config.json" "$work/empty/"
expect_error "no safetensors" "no model.safetensors" "$troupe" logits --model "$work/empty" --ids "$work/ids.json" --out "$work/x.npy"
echo '[1, 99999]' > "$work/big.json"
expect_error "token id outside the vocabulary" "outside the vocabulary" "$troupe" logits --model "$work/m" --ids "$work/big.json" --out "$work/x.npy"
echo '[1, "a"]' > "$work/str.json"
expect_error "non-integer ids" "token ids must be" "$troupe" logits --model "$work/m" --ids "$work/str.json" --out "$work/x.npy"
expect_error "bad temperature" "temperature must be" "$troupe" generate --model "$work/m" --prompt hi --temperature -1
expect_error "bad top_p" "top_p must be" "$troupe" generate --model "$work/m" --prompt hi --top-p 1.5
rm "$work/trunc/tokenizer.json"
expect_error "model without tokenizer" "no tokenizer.json" "$troupe" generate --model "$work/trunc" --prompt hi
expect_error "detokenize bad JSON" "expected a JSON array" sh -c "echo 'nope' | '$troupe' detokenize --tokenizer '$tok'"
expect_error "detokenize unknown id" "outside the tokenizer's vocabulary" sh -c "echo '[5, 70000]' | '$troupe' detokenize --tokenizer '$tok'"
echo '{"model": {"type": "WordPiece"}}' > "$work/wp.json"
expect_error "unsupported tokenizer" "BPE" sh -c "echo hi | '$troupe' tokenize --tokenizer '$work/wp.json'"
expect_error "tokenizer larger than the model vocab" "ids but the config's vocab_size is 97" \
  "$troupe" init-model --config <(sed 's/"vocab_size": 4096/"vocab_size": 97/' "$cfg") --out "$work/x"

# ngram-plan: sizes written into a config that init-model and logits then honour.
printf 'In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n%.0s' {1..200} > "$work/small.txt"
if "$troupe" ngram-plan --tokenizer "$tok" --corpus "$work/small.txt" --config "$cfg" --out "$work/planned.json" \
     --candidates 16 > "$work/plan.txt" 2>/dev/null && grep -q '"ngram_table_sizes"' "$work/planned.json" \
   && "$troupe" init-model --config "$work/planned.json" --out "$work/planned" --seed 1 >/dev/null 2>&1 \
   && "$troupe" logits --model "$work/planned" --ids "$work/ids.json" --out "$work/p.npy"; then
  pass "ngram-plan --out sizes are honoured by init-model and logits"
else
  fail "ngram-plan --out"
fi
: > "$work/empty.txt"
expect_error "ngram-plan: empty corpus" "corpus is empty" "$troupe" ngram-plan --tokenizer "$tok" --corpus "$work/empty.txt"
expect_error "ngram-plan: missing corpus" "does not exist" "$troupe" ngram-plan --tokenizer "$tok" --corpus "$work/nope.txt"
expect_error "ngram-plan: tokenizer does not match V" "does not match the model's vocabulary" \
  "$troupe" ngram-plan --tokenizer "$tok" --corpus "$work/small.txt" --vocab-size 1000
expect_error "ngram-plan: impossible budget" "leaves no room" \
  "$troupe" ngram-plan --tokenizer "$tok" --corpus "$work/small.txt" --vocab-ratio 0.0001
expect_error "ngram-plan: --out without --config" "needs --config" \
  "$troupe" ngram-plan --tokenizer "$tok" --corpus "$work/small.txt" --out "$work/x.json" --candidates 8
expect_error "ngram-plan: bad --eval size" "not a positive integer" \
  "$troupe" ngram-plan --tokenizer "$tok" --corpus "$work/small.txt" --eval 12X --candidates 8

# distill: the model's greedy continuations of prompts cut from text, as ids a training config reads.
if "$troupe" distill --model "$work/m" --data "$work/small.txt" --out "$work/distill.npy" --prompts 6 --prompt-tokens 8 \
     --max-tokens 5 --batch 4 --threads 1 2>"$work/distill.log" && [ -s "$work/distill.npy" ] \
   && grep -q "6 prompts" "$work/distill.log"; then
  pass "distill writes the continuations"
else
  fail "distill: $(tail -2 "$work/distill.log")"
fi
expect_error "distill: --out must be .npy" "must name a .npy" \
  "$troupe" distill --model "$work/m" --data "$work/small.txt" --out "$work/d.txt" --threads 1
expect_error "distill: more prompts than spans" "fewer than --prompts" \
  "$troupe" distill --model "$work/m" --data "$work/small.txt" --out "$work/d.npy" --prompts 100000000 --threads 1
expect_error "distill: missing data" "does not exist" \
  "$troupe" distill --model "$work/m" --data "$work/nope.txt" --out "$work/d.npy" --threads 1
expect_error "distill: zero prompt tokens" "at least 1" \
  "$troupe" distill --model "$work/m" --data "$work/small.txt" --out "$work/d.npy" --prompt-tokens 0 --threads 1

echo "$failures failure(s)"
[ $failures -eq 0 ]
