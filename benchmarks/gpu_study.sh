#!/usr/bin/env bash
# `orthofx study --profile gpu` on a CUDA machine (one GPU, one run at a time), writing into $OUT.
#
# Usage on the device machine (repo root):
#   bash benchmarks/gpu_study.sh "$OUT" [extra study options, e.g. --seeds 2 --rows SVD NOG --steps 4000]
# Fashion-MNIST (the four IDX .gz files): $ORTHOFX_DATA, or ./data/fashion-mnist in the repo (copy
# /usr/share/datasets/fashion-mnist there before sending the tree), or orthofx's other standard places.
# Resumable: rerunning with the same $OUT skips the finished runs (out/<exp>/<row>/seed<k>.json).
set -u
OUT=${1:-out/gpu-study}
shift || true
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# the repo as installed code: an editable install when pip can do it offline, else the source tree
if ! $PY -c "import orthofx" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.txt" 2>&1 || export PYTHONPATH=$PWD
fi
$PY -c "import orthofx" 2>/dev/null || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
$PY -c "import orthofx.data as d; print('fashion-mnist:', d.find_fashion_mnist())" || {
  echo "Fashion-MNIST not found: set ORTHOFX_DATA or copy it to ./data/fashion-mnist"; exit 2; }
PROGRESS=--no-progress
$PY -c "import tqdm" 2>/dev/null && [ -t 2 ] && PROGRESS=
$PY -m orthofx study --profile gpu --out "$OUT/study" $PROGRESS "$@" 2>&1 | tee "$OUT/study.txt"
rc=${PIPESTATUS[0]}
echo "study rc=$rc"
exit "$rc"
