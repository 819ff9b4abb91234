#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 8 minutes: GPU tests, eager vs fast torch backend end to
# end on mindhier-512 and mindhier-256 (batch 1 and 4, 1 and 4 samples per scan, guidance on every scale; the
# fast backend also without its fused kernels at batch 1), the image decoder alone by precision and layout,
# the Triton kernels vs dense-mask SDPA, the compute floor, and TensorRT where it is installed.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # on the GPU machine, from the repository root
#
# Results (8 files) go to $OUT: gpu.txt (nvidia-smi), gpu_tests.log, gpu_bench.{json,md,log},
# profile_fast_512.json, step0_kernels.txt, tensorrt.log. Copy them into benchmarks/results/ under the card's name.
# Time: an earlier version took 149 s on an H200 (2026-11-28); the parts added since are unmeasured (estimate: 2-3 min).
# Time limits per part (seconds) can be lowered for a short lease: TESTS_S, BENCH_S, PROF_S, STEP_S, TRT_S.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)

# The machine's own PyTorch/Triton stay; only this package is added (no dependency resolution, no network).
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/gpu_tests.log" 2>&1 || { cat "$OUT/gpu_tests.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

echo "== GPU tests ($(($(date +%s) - T0)) s)"
# no -x: every GPU test reports (the fast backend's graph captures and fused kernels are first run here)
timeout "${TESTS_S:-150}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_fused_norm.py \
  tests/test_sampling_kernel.py tests/test_torch_fast.py tests/test_tensorrt.py 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -15

echo "== eager vs fast, kernels, floor ($(($(date +%s) - T0)) s)"
timeout "${BENCH_S:-300}" $PY benchmarks/gpu_bench.py --out "$OUT" --presets mindhier-512,mindhier-256 \
  --repeats "${REPEATS:-3}" --warmup 1 2>&1 | tee "$OUT/gpu_bench.log" | tail -30

echo "== where the fast backend's time goes, per phase ($(($(date +%s) - T0)) s)"
timeout "${PROF_S:-90}" mindhier-rt profile --preset mindhier-512 --backend torch-fast --device cuda --batch 1 \
  --repeats 3 --warmup 1 --json "$OUT/profile_fast_512.json" 2>&1 | grep -E "^(encode|context|step \(all|update \(all|sample|decode|end to end)"

echo "== one step's kernels, fused vs unfused ($(($(date +%s) - T0)) s)"
timeout "${STEP_S:-90}" $PY benchmarks/gpu_step_profile.py --preset mindhier-512 --scale 0 --out "$OUT/step0_kernels.txt" \
  2>&1 | tail -2

echo "== TensorRT ($(($(date +%s) - T0)) s)"
if $PY -c "import tensorrt" 2>/dev/null && [ -f benchmarks/tensorrt_bench.py ]; then
  timeout "${TRT_S:-200}" $PY benchmarks/tensorrt_bench.py --out "$OUT" 2>&1 | tee "$OUT/tensorrt.log" | tail -20
else
  echo "TensorRT is not installed on this machine: skipped (pip install tensorrt)" | tee "$OUT/tensorrt.log"
fi
echo "== done in $(($(date +%s) - T0)) s"
