#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 8 minutes: GPU tests, eager vs fast torch backend end to
# end on mindhier-256 and mindhier-512 (batch 1 and 4, 1 and 4 samples per scan, guidance on every scale),
# the Triton kernels vs dense-mask SDPA, the compute floor, and TensorRT where it is installed.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # on the GPU machine, from the repository root
#
# Results (at most 8 files) go to $OUT: gpu.txt (nvidia-smi), gpu_tests.log, gpu_bench.{json,md,log},
# tensorrt.log. Copy gpu_bench.md / .json into benchmarks/results/ under the card's name.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# The machine's own PyTorch/Triton stay; only this package is added (no dependency resolution, no network).
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

echo "== GPU tests"
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== eager vs fast, kernels, floor"
timeout 330 $PY benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | tail -30

echo "== TensorRT"
if $PY -c "import tensorrt" 2>/dev/null && [ -f benchmarks/tensorrt_bench.py ]; then
  timeout 200 $PY benchmarks/tensorrt_bench.py --out "$OUT" 2>&1 | tee "$OUT/tensorrt.log" | tail -20
else
  echo "TensorRT is not installed on this machine: skipped (pip install tensorrt)" | tee "$OUT/tensorrt.log"
fi
