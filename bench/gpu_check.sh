#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see docs/benchmarks.md): CUDA tests, then the benchmark
# at 512x512. Expects the project's wheels (diffusers, fastapi, ...) in .whl/ and writes to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 IMAGEGEN_MODEL_CACHE_DIR=/tmp/imagegen-models
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.log" | tail -15
timeout 240 python3 bench/bench_serving.py --backends mp --size 512 --steps 20 --device cuda --raw-calls 20 \
    --single-requests 20 --requests-per-client 4 --json "$OUT/bench-512.json" 2>&1 | tee "$OUT/bench-512.log" | tail -12
