#!/usr/bin/env bash
# One-shot check on a CUDA machine (a lent H200: torch and triton preinstalled, nothing can be
# installed): build hpml_ops in place against that machine's torch, run the test suite on the
# GPU, run the benchmarks in GPU mode. Every step has a time limit and the whole a budget
# (seconds, default 540): a step that would not fit in what is left is skipped, saying so, so the
# script always ends with its results packed.
#
#   bash benchmarks/gpu_check.sh OUTDIR [BUDGET_S]
#
# OUTDIR receives summary.txt and gpu_check.tar.gz (every log and result file; a lent machine
# returns at most 8 files), repacked after each step so that a kill keeps what was done.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [BUDGET_S]}
BUDGET=${2:-540}
T0=$(date +%s)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
W=$(mktemp -d /tmp/gpu_check.XXXXXX)/gpu_check
mkdir -p "$W"
export PYTHONUNBUFFERED=1
# Only the machine's own arch: half the compile time of 8.0;9.0.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
export MAX_JOBS=${MAX_JOBS:-16}
# The real GPU runs the CUDA kernels here; the emulator (CI's way of running them) is left out.
export HPML_NO_EMU=1

summary="$OUT/summary.txt"
: > "$summary"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
pack() { tar -C "$(dirname "$W")" -czf "$OUT/gpu_check.tar.gz" gpu_check; }
# step NAME MAX_S MIN_S CMD...: run if at least MIN_S seconds are left, for at most MAX_S (or
# what is left, less 15 s for packing), output in NAME.log; records rc and seconds.
step() {
  local name=$1 max=$2 min=$3; shift 3
  local room=$(( $(left) - 15 ))
  if [ "$room" -lt "$min" ]; then
    echo "$name: skipped, ${room}s left of the budget (needs ${min}s)" | tee -a "$summary"
    return 99
  fi
  [ "$room" -lt "$max" ] && max=$room
  local t0=$(date +%s)
  timeout -k 5 "$max" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  pkill -f "pytest" 2> /dev/null || true  # xdist workers of a killed run
  local how=""
  [ "$rc" -eq 124 ] && how=" (stopped at its ${max}s limit)"
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s$how" | tee -a "$summary"
  pack
  return $rc
}

{
  echo "commit ${HPML_COMMIT:-unknown}"
  nvidia-smi
  lscpu | grep -E 'Model name|^CPU\(s\)'
  $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
  $PY -c 'import xdist, pytest_timeout; print("pytest-xdist and pytest-timeout present")'
} > "$W/machine.txt" 2>&1
grep -E 'commit|torch|NVIDIA H|Model name|xdist' "$W/machine.txt" | tee -a "$summary"

# The package installs editable (kernels/ maps to hpml_ops.kernels); the extension builds in
# place with its full ptxas report in the log.
step install 90 30 env HPML_SKIP_EXT=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
  || { echo "pip install -e failed: linking kernels/ in place" | tee -a "$summary"; ln -sfn ../kernels hpml_ops/kernels; }
if ! step build 330 60 $PY setup.py build_ext --inplace; then
  tail -n 40 "$W/build.log"
  exit 1
fi
grep -E '^\[hpml_ops build\]' "$W/build.log" | tee -a "$summary"

# The whole suite on the GPU (DEVICE=cuda in the tests: triton compiled, the CUDA kernels on the
# card), in parallel; a test hung for 90 s fails rather than eating the budget.
XDIST=""
$PY -c 'import xdist' 2> /dev/null && XDIST="-n 14"
TMO=""
$PY -c 'import pytest_timeout' 2> /dev/null && TMO="--timeout 90"
step tests 200 60 $PY -m pytest -v -rfE -p no:cacheprovider $XDIST $TMO --junitxml="$W/tests.xml" tests
grep -E '^(FAILED|ERROR)|passed|failed' "$W/tests.log" | tail -n 40 | tee -a "$summary"

B="--device cuda --out $W"
# issue 12's must-show: 64 wide x 4 hidden layers, batch 2^20, fp16, vs eager and torch.compile.
step bench_mlp 120 45 $PY benchmarks/bench_mlp.py $B --models narrow64 --modes fwd,fwd+bwd,step
step bench_bce_with_logits 60 30 $PY benchmarks/bench_bce_with_logits.py $B
step bench_batch_norm 60 30 $PY benchmarks/bench_batch_norm.py $B
# torch.compile of a matrix product is cuBLAS plus a fused epilogue (max-autotune, which compiles
# for minutes per shape, is left out): eager stands for it here.
step bench_linear_act 90 40 $PY benchmarks/bench_linear_act.py $B --providers eager,cpp,triton \
  --shapes 4096x1024x1024,8192x8192x8192
step bench_mlp_wide 60 40 $PY benchmarks/bench_mlp.py $B --models wide --tag _wide
step bench_train_step 60 40 $PY benchmarks/bench_train_step.py $B
pack

echo
echo "== summary ($(( $(date +%s) - T0 ))s of ${BUDGET}s) =="
cat "$summary"
for f in "$W"/*_cuda*.md; do [ -f "$f" ] && { echo; echo "== $(basename "$f") =="; cat "$f"; }; done
