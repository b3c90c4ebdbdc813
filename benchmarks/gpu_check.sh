#!/usr/bin/env bash
# One-shot check on a CUDA machine (a lent H200: torch and triton preinstalled, nothing can be
# installed): build hpml_ops in place against that machine's torch, run the test suite on the
# GPU, run the benchmarks in GPU mode. Logs and results go to OUTDIR; a short summary is printed
# last. Sized to finish within 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Only the machine's own arch: half the compile time of 8.0;9.0.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
export MAX_JOBS=${MAX_JOBS:-16}

summary="$OUT/summary.txt"
: > "$summary"
step() {  # step NAME TIMEOUT_S CMD...: run, log to OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$summary"
  return $rc
}

{ nvidia-smi; $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'; } > "$OUT/machine.txt" 2>&1
head -n 20 "$OUT/machine.txt"

# The package installs editable (kernels/ maps to hpml_ops.kernels); the extension builds in
# place with its full ptxas report in the log.
step install 120 env HPML_SKIP_EXT=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
  || { echo "pip install -e failed: linking kernels/ in place"; ln -sfn ../kernels hpml_ops/kernels; }
step build 300 $PY setup.py build_ext --inplace || { tail -n 40 "$OUT/build.log"; exit 1; }
grep -E '^\[hpml_ops build\]' "$OUT/build.log"

step tests 240 $PY -m pytest -q -ra -p no:cacheprovider --junitxml="$OUT/tests.xml"
tail -n 15 "$OUT/tests.log"

step bench_bce_with_logits 150 $PY benchmarks/bench_bce_with_logits.py --device cuda --out "$OUT"
# max-autotune compiles for minutes per shape: left out of the one-shot check.
step bench_linear_act 200 $PY benchmarks/bench_linear_act.py --device cuda --out "$OUT" \
  --providers eager,compile,cpp,triton --shapes 4096x1024x1024,4096x4096x4096,8192x8192x8192
step bench_batch_norm 120 $PY benchmarks/bench_batch_norm.py --device cuda --out "$OUT"
step bench_train_step 150 $PY benchmarks/bench_train_step.py --device cuda --out "$OUT"

echo
echo "== summary =="
cat "$summary"
for f in "$OUT"/*_cuda.md; do [ -f "$f" ] && { echo; echo "== $(basename "$f") =="; cat "$f"; }; done
