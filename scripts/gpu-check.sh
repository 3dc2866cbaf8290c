#!/usr/bin/env bash
# Prepares the GPU checks for the lent GPU machine (it has CUDA, PyTorch and transformers but
# none of our Debian libraries): builds the CUDA tests without -march=native into build-gpu/,
# packs them with their libraries into gpu-bundle/ (git-ignored), and adds the transformers
# comparison cases (plain LongcatFlashForCausalLM models, default RoPE and YaRN, with Troupe's
# CPU logits). Then, on the GPU machine, with gpu-bundle carried:
#   gpu-bundle/check.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTROUPE_NATIVE=OFF >/dev/null
ninja -C build-gpu troupe troupe_cuda_tests
rm -rf gpu-bundle
../shared/scripts/gpu-bundle.sh gpu-bundle build-gpu/gpu/cuda/troupe_cuda_tests build-gpu/troupe
mkdir -p gpu-bundle/cases
cp tests/reference/check_transformers.py tests/reference/longcat_reference.py gpu-bundle/
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
nvidia-smi -L
gpu-bundle/run troupe_cuda_tests || status=1
python3 gpu-bundle/check_transformers.py ${cases[*]} || status=1
exit \$status
CHECK
chmod +x gpu-bundle/check.sh
du -sh gpu-bundle
