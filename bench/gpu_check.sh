#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see docs/benchmarks.md): sections of at most 14 minutes in all, each
# under its own time budget (`timeout`): a section that runs out is cut, the next one still runs.
#   1. the CUDA tests                                        (100 s)
#   2. the serving benchmark, tiny model at 512x512           (45 s)
#   3. random-flux-dev 1024x1024, 28 steps, bfloat16: raw diffusers, imagegen plain,
#      imagegen compile regional + taylorseer                (240 s)
#   4. random-sdxl 1024x1024, 20 steps: raw, plain, compile regional (120 s)
#   5. a CFG pair on the one GPU (two ranks share it, gloo between them) against one rank,
#      tiny model at 512x512, 20 steps                        (30 s)
#   6. quantization: random-flux-dev 1024x1024, 28 steps, bfloat16 against int8wo and a float8dq
#      transformer with an int8wo T5; seconds per image and the peak memory of a call, which
#      must stay under 24 GiB for the quantized FLUX-dev-size pipeline   (150 s)
#   7. images at GPU speed: random-sdxl 1024x1024, 4 steps, the raw pipeline plus one PNG write against
#      imagegen at 1 and 8 clients: images/s, p50, and the server's CPU per image    (150 s)
# Arguments pick sections by name (cuda-tests bench-tiny-512 levers-flux-dev levers-sdxl cfg-pair-512
# quantization pixels-sdxl); none runs them all (their budgets add up to 14 minutes; pick some within a 15-minute lease):
#   bash bench/gpu_check.sh quantization cfg-pair-512
# Expects the project's wheels (diffusers, transformers, accelerate, torchao, gguf, fastapi, ...) in .whl/
# and writes to $OUT. Sections 3, 4, 6 and 7 build the random-weight models on the GPU (34 GB and 7 GB in
# bfloat16).
set -uo pipefail
SECTIONS=" $* "
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 IMAGEGEN_MODEL_CACHE_DIR=/tmp/imagegen-models
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, accelerate, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'torchao', torchao.__version__)" | tee -a "$OUT/gpu.txt"
uptime | tee -a "$OUT/gpu.txt"

section() {  # section NAME SECONDS COMMAND...: run COMMAND under a budget, log to $OUT/NAME.log
    local name=$1 budget=$2; shift 2
    if [[ "$SECTIONS" != "  " && "$SECTIONS" != *" $name "* ]]; then return; fi
    echo "== $name (budget ${budget}s)"
    local started=$SECONDS
    timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - started))s" | tee -a "$OUT/$name.log"
    tail -14 "$OUT/$name.log"
}

section cuda-tests 100 python3 -m pytest -q -p no:cacheprovider -p no:randomly tests/integration/test_cuda.py
section bench-tiny-512 45 python3 bench/bench_serving.py --backends mp --size 512 --steps 20 --device cuda \
    --raw-calls 8 --single-requests 8 --requests-per-client 2 --skip-naive --json "$OUT/bench-512.json"
section levers-flux-dev 240 python3 bench/bench_levers.py --model random-flux-dev --size 1024 --steps 28 \
    --device cuda --requests 2 --rows raw,plain,compile+taylorseer --json "$OUT/levers-flux-dev.json"
section levers-sdxl 120 python3 bench/bench_levers.py --model random-sdxl --size 1024 --steps 20 \
    --device cuda --requests 2 --rows raw,plain,compile --json "$OUT/levers-sdxl.json"
section cfg-pair-512 30 python3 bench/bench_serving.py --backends mp,mp_cfg_parallel --size 512 --steps 20 \
    --device cuda --raw-calls 4 --single-requests 4 --requests-per-client 1 --skip-naive --json "$OUT/cfg-pair-512.json"
section quantization 150 python3 bench/bench_quantization.py --model random-flux-dev --size 1024 --steps 28 \
    --device cuda --rows bf16,int8wo,float8dq+int8wo-t5 --limit-gib 24 --json "$OUT/quantization.json"
section pixels-sdxl 150 python3 bench/bench_serving.py --workload pixels --model random-sdxl --size 1024 --steps 4 \
    --device cuda --pixels-clients 1,8 --pixels-requests 8 --idle-window-s 5 --json "$OUT/pixels-sdxl.json"
