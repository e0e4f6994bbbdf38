#!/usr/bin/env bash
# One prepared GPU session: CUDA test subset + the full overhead benchmark.
# Usage on the device machine (repo root): bash benchmarks/gpu_run.sh "$OUT"
set -u
OUT=${1:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
timeout 260 python3 benchmarks/overhead.py --device cuda --rounds 5 --json "$OUT/overhead_gpu.json" > "$OUT/overhead_gpu.txt" 2>&1
echo "overhead rc=$?"; tail -75 "$OUT/overhead_gpu.txt"
python3 benchmarks/report.py "$OUT/overhead_gpu.json" -o "$OUT/overhead_gpu.md" | tail -6
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_nn.py tests/test_monitor.py tests/test_transform.py \
  tests/test_linalg_expm.py tests/test_linalg_polar.py tests/test_attach.py tests/test_cuda_graphs.py \
  -k "cuda or device or graph" > "$OUT/pytest_cuda.txt" 2>&1
echo "pytest rc=$?"; tail -5 "$OUT/pytest_cuda.txt"
