#!/usr/bin/env bash
# The GPU check of the rwkv7_wkv kernel, for an H100/H200 machine with torch (CUDA), nvcc and nothing else to
# install; about 3-4 minutes. Builds the CUDA variant into kernels/rwkv7_wkv/build/, checks forward, backward and
# decode against the reference recurrence, and times the kernel against the chunked PyTorch path and fla.
# Results also go to $OUT/gpu_check.json when OUT is set. Extra arguments are passed to scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
nvcc --version | tail -n 1 || true

MAX_JOBS=${MAX_JOBS:-8} "$PYTHON" scripts/build_kernel.py --cuda
"$PYTHON" scripts/gpu_check.py ${OUT:+--json "$OUT/gpu_check.json"} "$@"
