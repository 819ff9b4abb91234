#!/usr/bin/env bash
# Everything that needs a GPU, in one call of at most 8 minutes that writes at most 8 files:
#   1. the GPU tests (kernels against their references, the fast backend's tokens against eager, TensorRT);
#   2. benchmarks/gpu_bench.py on mindhier-512 (bf16, guidance on every scale, batch 1, 1 and 4 samples):
#      eager vs fast end to end against the floor and issue 14's targets, the fast path without its fused
#      kernels, the fast backend's per-phase profile against the per-phase targets, float32 eager vs float32
#      fast, the eager step under torch.compile (capped), the image decoder by precision and layout, the
#      attention kernels vs dense-mask SDPA;
#   3. one generator step's kernels, fused vs unfused (benchmarks/gpu_step_profile.py);
#   4. TensorRT, where it is installed.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # on the GPU machine, from the repository root
#
# Files in $OUT (6; 8 with TensorRT: tensorrt_bench.{json,md}): gpu_tests.log (the card and versions first), gpu_bench.json, gpu_bench.md, gpu_bench.log,
# step0_kernels.txt, tensorrt.log. Copy them into benchmarks/results/<card>/ with this command line.
# Each part has a cap in seconds (TESTS_S, BENCH_S, STEP_S, TRT_S; the torch.compile row COMPILE_S inside the
# benchmark) and no part may run past the overall deadline TOTAL_S (default 470 s, under the 8 minutes).
# PRESETS (default mindhier-512), REPEATS (default 5) and DTYPE (default bfloat16) choose what is timed.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-470}

# seconds a part may run: its cap, or what is left before the deadline (less a few seconds to write up)
budget() {
  local left=$((TOTAL_S - ($(date +%s) - T0) - 5))
  [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"
}

# The machine's own PyTorch/Triton stay; only this package is added (no dependency resolution, no network).
PIP_LOG=$(mktemp)
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$PIP_LOG" 2>&1 || { cat "$PIP_LOG"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "command: OUT=... TOTAL_S=$TOTAL_S PRESETS=${PRESETS:-mindhier-512} REPEATS=${REPEATS:-5} bash benchmarks/gpu_check.sh"
} 2>&1 | tee "$OUT/gpu_tests.log"

echo "== GPU tests ($(($(date +%s) - T0)) s)"
# no -x: every GPU test reports (the fast backend's graph captures and fused kernels are first run here)
timeout "$(budget "${TESTS_S:-110}")" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py \
  tests/test_fused_norm.py tests/test_sampling_kernel.py tests/test_torch_fast.py tests/test_tensorrt.py 2>&1 \
  | tee -a "$OUT/gpu_tests.log" | tail -15

echo "== eager vs fast, phases, float32, torch.compile, decoder, kernels ($(($(date +%s) - T0)) s)"
timeout "$(budget "${BENCH_S:-280}")" $PY benchmarks/gpu_bench.py --out "$OUT" --presets "${PRESETS:-mindhier-512}" \
  --batches 1 --samples 1,4 --repeats "${REPEATS:-5}" --dtype "${DTYPE:-bfloat16}" --warmup 1 --compile-cap "${COMPILE_S:-110}" 2>&1 \
  | tee "$OUT/gpu_bench.log" | tail -40

echo "== one step's kernels, fused vs unfused ($(($(date +%s) - T0)) s)"
timeout "$(budget "${STEP_S:-45}")" $PY benchmarks/gpu_step_profile.py --preset mindhier-512 --scale 0 \
  --out "$OUT/step0_kernels.txt" 2>&1 | tail -2

echo "== TensorRT ($(($(date +%s) - T0)) s)"
if $PY -c "import tensorrt" 2>/dev/null && [ -f benchmarks/tensorrt_bench.py ]; then
  timeout "$(budget "${TRT_S:-60}")" $PY benchmarks/tensorrt_bench.py --out "$OUT" 2>&1 | tee "$OUT/tensorrt.log" | tail -20
else
  echo "TensorRT is not installed on this machine: skipped (pip install tensorrt)" | tee "$OUT/tensorrt.log"
fi
echo "== done in $(($(date +%s) - T0)) s"
