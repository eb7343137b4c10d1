#!/usr/bin/env bash
# The GPU check of the rwkv7_wkv kernel, for an H100/H200 machine with torch (CUDA) and the CUDA toolkit, nothing to
# download (`rwkv` and fla are used when installed); under 8 minutes on an H200 with 16 cores:
#   1. builds the CUDA variant for this GPU into kernels/rwkv7_wkv/build/            (~1 min)
#   2. compute-sanitizer memcheck, racecheck, synccheck, initcheck on tiny shapes     (~3 min)
#   3. correctness against the reference recurrence and BlinkDL's official kernel     (<1 min)
#   4. timing against the chunked PyTorch path, the official kernel and fla           (~2 min)
# Every step runs even if an earlier one fails; the exit status is 1 if any failed. Results also go to
# $OUT/gpu_check.json and $OUT/gpu_check.log when OUT is set. Extra arguments are passed to the kernel's check,
# kernels/rwkv7_wkv/benchmarks/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
LOG=${OUT:+$OUT/gpu_check.log}
exec > >(tee ${LOG:-/dev/null}) 2>&1
failed=()

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
nvcc --version | tail -n 1 || true

echo "== 1. build"
MAX_JOBS=${MAX_JOBS:-16} timeout 300 "$PYTHON" scripts/build_kernel.py --cuda || { echo "build failed"; exit 1; }

echo "== 2. compute-sanitizer"
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -z "$SANITIZER" ]; then
    echo "SKIP  compute-sanitizer not found (CUDA_HOME=${CUDA_HOME:-unset})"
    failed+=("compute-sanitizer missing")
else
    # torch's caching allocator off, so that every tensor is its own allocation and an access past its end is seen
    for tool in memcheck racecheck synccheck initcheck; do
        started=$SECONDS
        if PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
            "$PYTHON" kernels/rwkv7_wkv/benchmarks/gpu_check.py --sanitize; then
            echo "PASS  compute-sanitizer $tool ($((SECONDS - started)) s)"
        else
            echo "FAIL  compute-sanitizer $tool (status $?, $((SECONDS - started)) s)"
            failed+=("sanitizer $tool")
        fi
    done
fi

echo "== 3-4. correctness and timing"
timeout 300 "$PYTHON" kernels/rwkv7_wkv/benchmarks/gpu_check.py ${OUT:+--json "$OUT/gpu_check.json"} "$@" || failed+=("gpu_check.py")

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
