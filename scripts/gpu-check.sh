#!/usr/bin/env bash
# Prepares the GPU checks for the lent GPU machine (it has CUDA, PyTorch and transformers but
# none of our Debian libraries): builds the CUDA tests, the CLI and the decode benchmark
# without -march=native into build-gpu/, packs them with their libraries into gpu-bundle/
# (git-ignored), and adds the transformers comparison cases (plain LongcatFlashForCausalLM
# models, default RoPE and YaRN, with Troupe's CPU logits; the GPU logits are computed there).
# Then, on the GPU machine, with gpu-bundle carried:
#   gpu-bundle/check.sh          the CUDA tests, the transformers comparisons (CPU and GPU) and
#                                serving through the actor graph on the GPU
#   gpu-bundle/bench.sh          batch-1 decode against the bandwidth roofline (demo, lite-1b)
#   gpu-bundle/profile.sh        where lite-1b's graph decode step spends its time (ncu, per kernel)
#   gpu-bundle/train_bench.sh    lite-1b training tokens/s and MFU on one GPU against PyTorch
#   bench/speculative_gpu.sh     (after gpu-bundle/unpack.sh, with TROUPE=gpu-bundle/troupe and
#                                BENCH="gpu-bundle/run troupe_bench_speculative") speculative
#                                decoding with a trained lite-1b target and a distilled draft
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTROUPE_NATIVE=OFF >/dev/null
ninja -C build-gpu troupe troupe_cuda_tests troupe_bench_cuda_decode troupe_bench_cuda_sampling troupe_bench_cuda_train \
  troupe_bench_speculative troupe_bench_graph_speculative
rm -rf gpu-bundle
../shared/scripts/gpu-bundle.sh gpu-bundle build-gpu/gpu/cuda/troupe_cuda_tests build-gpu/troupe \
  build-gpu/bench/troupe_bench_cuda_decode build-gpu/bench/troupe_bench_cuda_sampling build-gpu/bench/troupe_bench_cuda_train \
  build-gpu/bench/troupe_bench_speculative build-gpu/bench/troupe_bench_graph_speculative
strip -s gpu-bundle/bin/*  # symbols are a third of the executables; the carry limit is tight
# OpenBLAS alone is 36 MB; with the tracked tree the carry would pass 64 MiB. It travels
# compressed and check.sh / bench.sh unpack it on the GPU machine.
python3 -c "import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), lzma.open(sys.argv[1] + '.xz', 'wb', preset=6))" \
  gpu-bundle/lib/libopenblas.so.0
rm gpu-bundle/lib/libopenblas.so.0
cat > gpu-bundle/unpack.sh <<'UNPACK'
#!/usr/bin/env bash
unxz() { [ -f "${1%.xz}" ] || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], 'wb'))" "$1"; }
unxz gpu-bundle/lib/libopenblas.so.0.xz
mkdir -p .deps/corpora
for f in gpu-bundle/corpora/*.xz; do unxz "$f" && ln -sf "$PWD/${f%.xz}" .deps/corpora/; done
UNPACK
chmod +x gpu-bundle/unpack.sh
mkdir -p gpu-bundle/cases
head -c 150000 .deps/corpora/kjv.txt > gpu-bundle/cases/corpus.txt
head -c 3000000 .deps/corpora/kjv.txt > gpu-bundle/cases/corpus-large.txt
# The demo corpora for bench/speculative_gpu.sh (8.6 MB, 2.8 MB compressed): unpack.sh puts them
# where the training configs look (.deps/corpora).
mkdir -p gpu-bundle/corpora
for f in kjv jargon fortunes; do
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), lzma.open(sys.argv[2], 'wb', preset=6))" \
    .deps/corpora/$f.txt gpu-bundle/corpora/$f.txt.xz
done
printf '#!/usr/bin/env bash\nexec "$(dirname "$0")/run" troupe "$@"\n' > gpu-bundle/troupe && chmod +x gpu-bundle/troupe
cp tests/reference/check_transformers.py tests/reference/longcat_reference.py scripts/gpu_serve_check.py \
  scripts/gpu_profile_summary.py gpu-bundle/
/usr/bin/python3 - <<'PY'
import json, random
base = json.load(open("tests/reference/configs/plain.json"))
json.dump(base, open("gpu-bundle/cases/plain.json", "w"))
yarn = dict(base, rope_theta=50000.0, rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                                                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707})
json.dump(yarn, open("gpu-bundle/cases/plain_yarn.json", "w"))
r = random.Random(3)
ids = [r.randrange(3, 211) for _ in range(64)]
ids[20] = 2
json.dump(ids, open("gpu-bundle/cases/ids.json", "w"))
PY
cases=()
for c in plain plain_yarn; do
  build/troupe init-model --config gpu-bundle/cases/$c.json --out gpu-bundle/cases/$c --seed 21 --tokenizer "" 2>/dev/null
  build/troupe logits --model gpu-bundle/cases/$c --ids gpu-bundle/cases/ids.json --out gpu-bundle/cases/$c.troupe.npy
  cases+=(--case "gpu-bundle/cases/$c" gpu-bundle/cases/ids.json "gpu-bundle/cases/$c.troupe.npy")
done
cat > gpu-bundle/check.sh <<CHECK
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root.
set -uo pipefail
status=0
gpu-bundle/unpack.sh
nvidia-smi -L
export TROUPE_TEST_TMP=/tmp/troupe-test-tmp
mkdir -p \$TROUPE_TEST_TMP
gpu-bundle/run troupe_cuda_tests || status=1
echo "== transformers (float64) vs Troupe on the CPU (computed here before the run)"
python3 gpu-bundle/check_transformers.py ${cases[*]} || status=1
echo "== transformers (float64) vs Troupe on the GPU (bf16 weights and GEMM inputs)"
gpu_cases=()
for c in plain plain_yarn; do
  gpu-bundle/run troupe logits --device cuda --model gpu-bundle/cases/\$c --ids gpu-bundle/cases/ids.json \\
    --out /tmp/\$c.cuda.npy || status=1
  gpu_cases+=(--case gpu-bundle/cases/\$c gpu-bundle/cases/ids.json /tmp/\$c.cuda.npy)
done
python3 gpu-bundle/check_transformers.py "\${gpu_cases[@]}" --tol 1e-2 --min-agreement 0.95 --bf16-baseline || status=1
echo "== training through the actor pipeline on the GPU (stages, replicas, resume, against the CPU's losses)"
TROUPE_CORPUS=\$PWD/gpu-bundle/cases/corpus.txt bash tests/training/check_training.sh \$PWD/gpu-bundle/troupe /tmp/train-check cuda || status=1
echo "== serving: the actor graph on the CPU, on the GPU, and on the GPU with the demo draft"
python3 gpu-bundle/gpu_serve_check.py gpu-bundle models/demo models/demo-draft || status=1
exit \$status
CHECK
chmod +x gpu-bundle/check.sh
cp configs/models/lite-1b.json gpu-bundle/
cat > gpu-bundle/bench.sh <<'BENCH'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: batch-1 decode of the demo model and of a
# 1.83B Lite-shaped model (random weights, written to /tmp first) against the roofline.
set -euo pipefail
gpu-bundle/unpack.sh
gpu-bundle/run troupe_bench_cuda_decode models/demo 256
[ -d /tmp/lite-1b ] || gpu-bundle/run troupe init-model --config gpu-bundle/lite-1b.json --out /tmp/lite-1b --seed 1 --tokenizer ""
gpu-bundle/run troupe_bench_cuda_decode /tmp/lite-1b 128
echo "== PyTorch on the same GPU and model (bf16 weights), 16 + 64 tokens: eager at batch 1 / 16 / 64, the tuned"
echo "   compiled decoder (--static --compile: static shapes, reduce-overhead) at batch 1"
for b in 1 16 64; do
  timeout 240 python3 bench/pytorch_decoder.py /tmp/lite-1b 16 64 16 --device cuda --batch $b 2>&1 | tail -1 | cut -c1-80 || true
done
timeout 300 python3 bench/pytorch_decoder.py /tmp/lite-1b 16 64 16 --device cuda --static --compile 2>&1 | tail -1 | cut -c1-80 || true
echo "== sampling on the device against downloading the logits and sampling on the host"
gpu-bundle/run troupe_bench_cuda_sampling 30
echo "== speculative decoding on the GPU (models/demo with models/demo-draft, greedy, 200 tokens, batch 1)"
for k in 0 1 3; do
  args=(generate --device cuda --model models/demo --prompt "And the LORD said unto Moses" --max-tokens 200 --temperature 0)
  [ "$k" -gt 0 ] && args+=(--draft models/demo-draft --draft-tokens "$k" --draft-retry-after 0)
  echo "k=$k: $(gpu-bundle/run troupe "${args[@]}" 2>&1 >/dev/null | grep -E 'tok/s|speculation:' | tr '\n' ' ')"
done
BENCH
chmod +x gpu-bundle/bench.sh
cat > gpu-bundle/profile.sh <<'PROFILE'
#!/usr/bin/env bash
# ncu over replayed batch-1 decode steps of lite-1b (graph nodes profiled one by one, clocks and
# caches as in a real run), summed per kernel.
set -euo pipefail
gpu-bundle/unpack.sh
[ -d /tmp/lite-1b ] || gpu-bundle/run troupe init-model --config gpu-bundle/lite-1b.json --out /tmp/lite-1b --seed 1 --tokenizer "" >/dev/null
ncu --graph-profiling node --clock-control none --cache-control none --metrics gpu__time_duration.sum,launch__grid_size \
  --csv --launch-skip 3000 --launch-count 1000 gpu-bundle/run troupe_bench_cuda_decode /tmp/lite-1b 24 16 --profile \
  > /tmp/profile.csv 2>/tmp/profile.err
python3 gpu-bundle/gpu_profile_summary.py /tmp/profile.csv mla_decode=12 | head -45  # lite-1b: 12 attention layers
PROFILE
chmod +x gpu-bundle/profile.sh
cat > gpu-bundle/train_bench.sh <<'TRAIN'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: training steps of lite-1b (random tokens,
# SEQUENCES x SEQ_LEN a step) with the GPU stage in each GEMM math, then bench/pytorch_train.py
# (the same model, batch and fused AdamW, eager; bf16 autocast, TF32 and float32) in the same call.
#   gpu-bundle/train_bench.sh [SEQUENCES] [SEQ_LEN] [STEPS]
set -uo pipefail
gpu-bundle/unpack.sh
sequences=${1:-8}; seq_len=${2:-1024}; steps=${3:-8}
config=configs/models/lite-1b.json
for math in tf32 f32; do
  gpu-bundle/run troupe_bench_cuda_train $config $sequences $seq_len $steps $math 2>/tmp/train_$math.err || tail -3 /tmp/train_$math.err
done
for precision in bf16 tf32 f32; do
  echo "pytorch $precision: $(timeout 400 python3 bench/pytorch_train.py $config $sequences $seq_len $steps 16 cuda $precision 2>&1 | tail -1 | cut -c1-200)"
done
TRAIN
chmod +x gpu-bundle/train_bench.sh
cat > gpu-bundle/train_scaling.sh <<'SCALE'
#!/usr/bin/env bash
# Runs on a machine of 2+ GPUs from the repository root: `troupe train` of lite-1b on 3 MB of
# KJV through the actor pipeline, one replica on one GPU against two replicas on two GPUs
# (8 sequences of 1024 tokens per replica a step; the replicas all-reduce over NCCL): tokens/s
# over the steps after the first two, from metrics.jsonl.
#   gpu-bundle/train_scaling.sh [STEPS]
set -uo pipefail
gpu-bundle/unpack.sh
steps=${1:-12}
work=/tmp/train-scaling; rm -rf $work; mkdir -p $work
for replicas in 1 2; do
  cat > $work/r$replicas.json <<JSON
{"model": "$PWD/configs/models/lite-1b.json", "tokenizer": "$PWD/configs/tokenizers/troupe-bpe-4k.json",
 "data": {"paths": ["$PWD/gpu-bundle/cases/corpus-large.txt"], "seq_len": 1024}, "batch": {"sequences": $((8 * replicas))},
 "pipeline": {"replicas": $replicas}, "steps": $steps, "optimizer": {"warmup_steps": 2}, "out": "$work/r$replicas",
 "eval_sequences": 1, "log_every": 1, "device": "cuda"}
JSON
  gpu-bundle/troupe train --config $work/r$replicas.json --quiet 2>$work/r$replicas.log || tail -5 $work/r$replicas.log
  echo "replicas $replicas: $(grep -h 'NCCL\|stage actors' $work/r$replicas.log | tr '\n' ' ')"
  python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "\"loss\"" in l]
a, b = rows[1], rows[-1]
print("  tokens/s %.0f over steps %d-%d, loss %.3f -> %.3f" % ((b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]), a["step"] + 1, b["step"], rows[0]["loss"], b["loss"]))' $work/r$replicas/metrics.jsonl
done
SCALE
chmod +x gpu-bundle/train_scaling.sh
du -sh gpu-bundle
