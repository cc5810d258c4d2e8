#!/usr/bin/env bash
# One prepared GPU session: correctness first, then the benchmarks, all output under $OUT (or ./out).
# Usage on the lent GPU machine (torch, triton, transformers preinstalled there), in two calls that each fit the
# device tool's 600 s per command (the whole session has 15 minutes of device time):
#   bash benchmarks/gpu_check.sh tests     # ~4 min: kernels, GPU backends vs fp32 CPU, generation, CUDA graphs
#   bash benchmarks/gpu_check.sh bench     # ~9 min: prefill vs compute floor, kernels, decode graphs vs eager, ...
# (no argument: both, for a machine without that limit)
set -uo pipefail
PART=${1:-all}
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PACKSERVE_DEVICE=cuda
python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$PART" = all ] || [ "$PART" = tests ]; then
  # Correctness: bf16 kernel tests (skipped on CPU), GPU backends vs fp32 CPU, CUDA graphs vs transformers.
  PACKSERVE_DEVICE=cpu timeout 240 python -m pytest -q -x -p no:cacheprovider --import-mode=importlib \
    tests/kernels tests/models/test_gpu_backends.py tests/models/test_norm_conversion.py \
    tests/engine/test_generate.py tests/engine/test_decode_graphs.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
fi
if [ "$PART" = all ] || [ "$PART" = bench ]; then
  timeout 150 python benchmarks/prefill.py --gpu 2>&1 | grep -v -E "Writing|Loading" | tee "$OUT/prefill.txt"
  timeout 180 python benchmarks/gpu_decode.py 2>&1 | grep -v -E "Writing|Loading" | tee "$OUT/gpu_decode.txt"
  timeout 60 python benchmarks/kernels.py 2>&1 | tee "$OUT/kernels.txt"
  timeout 45 python benchmarks/decode_attention.py 2>&1 | tee "$OUT/decode_attention.txt"
  timeout 60 python benchmarks/linear_attention.py 2>&1 | tee "$OUT/linear_attention.txt"
fi
exit 0
