#!/usr/bin/env bash
# Compares Troupe's logits and n-gram ids with the independent float64 PyTorch reference
# (longcat_reference.py) on random-weight models of every config in configs/, for a token
# sequence holding several EOS-separated documents; Troupe runs it as one prefill and as
# decode steps (--chunk 1 and 5). Tolerance: relative L2 1e-4 on float32 logits against a
# float64 reference (observed ~1e-6; a wrong scale, norm, rope or routing gives >1e-2).
# Usage: check_logits.sh TROUPE_EXE WORK_DIR
set -euo pipefail
troupe=$1
work=$2
here=$(cd "$(dirname "$0")" && pwd)
py=/usr/bin/python3
$py -c "import torch, numpy" 2>/dev/null || { echo "python3-torch and python3-numpy are required (scripts/setup.sh installs them)"; exit 1; }
rm -rf "$work"; mkdir -p "$work"
# 48 tokens, three documents (EOS = 2 at positions 15 and 31), ids spread over the vocabulary.
$py -c "
import json, random
r = random.Random(5)
ids = [r.randrange(3, 211) for _ in range(48)]
ids[15] = ids[31] = 2
json.dump(ids, open('$work/ids.json', 'w'))"
status=0
# Every config as bf16 (the released dtype), plus the n-gram config as f16 and as float32 in
# 50 kB shards (model.safetensors.index.json), so each reader path meets the reference.
cases=()
for cfg in "$here"/configs/*.json; do cases+=("$(basename "$cfg" .json):$cfg:bf16:2048"); done
cases+=("ngram_f16:$here/configs/ngram.json:f16:2048" "ngram_f32_sharded:$here/configs/ngram.json:f32:0.05")
for case in "${cases[@]}"; do
  IFS=: read -r name cfg dtype shard_mb <<<"$case"
  echo "== $name ($dtype)"
  "$troupe" init-model --config "$cfg" --out "$work/$name" --seed 11 --tokenizer "" --dtype "$dtype" \
      --max-shard-mb "$shard_mb" >/dev/null 2>&1
  "$troupe" logits --model "$work/$name" --ids "$work/ids.json" --out "$work/$name.prefill.npy" --ngram-ids "$work/$name.ngram.npy" --threads 1
  "$troupe" logits --model "$work/$name" --ids "$work/ids.json" --out "$work/$name.decode1.npy" --chunk 1 --threads 1
  "$troupe" logits --model "$work/$name" --ids "$work/ids.json" --out "$work/$name.decode5.npy" --chunk 5 --threads 1
  ngram_arg=()
  [ "$name" = plain ] || ngram_arg=(--ngram-ids "$work/$name.ngram.npy")
  $py "$here/longcat_reference.py" --model "$work/$name" --ids "$work/ids.json" "${ngram_arg[@]}" \
      --logits "$work/$name.prefill.npy" "$work/$name.decode1.npy" "$work/$name.decode5.npy" --tol 1e-4 || status=1
done
exit $status
