#!/usr/bin/env bash
# The one prepared benchmark run for the GPU machine (one NVIDIA H200): the
# ANCHORS sizes (CNN 256/1024/4096, transformer 32/128, MLP 1024), every
# method available, Poisson overhead, accountant speed and the largest batch
# that fits, the keep_fraction sweep, a precision check and the model zoo, in
# under 10 minutes.
#
#   bash benchmarks/fetch_wheels.sh     # once, on a machine with a package index
#   bash benchmarks/gpu.sh              # on the GPU machine, from anywhere
#
# Through the session's device tool:
#   run(command="bash benchmarks/gpu.sh", carry=["benchmarks/wheels"], timeout_s=595)
#
# The machine has JAX, flax, optax, chex, PyTorch and Python 3.12 but no
# package index. Wheels found in $BENCH_WHEELS, benchmarks/wheels/, wheels/ or
# .whl/ are installed into /tmp/dpjax-bench-site (first folder found):
# dp-accounting is needed by dpjax itself; jax-privacy (+ pydantic, ...) and
# opacus enable those peers. A peer whose package is missing is skipped and the
# reason recorded. Extra arguments go to `python -m benchmarks.run`.
#
# Results: benchmarks/results/<device>/{results.json,results.md,throughput.png,memory.png};
# with $OUT set (the device tool), copies of those and gpu.log land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
START=$(date +%s)

export XLA_PYTHON_CLIENT_PREALLOCATE=false          # grow on demand: peak memory means something
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
BUDGET_S=${BENCH_BUDGET_S:-240}    # no new task starts after this (the run itself stops tasks at it)
HARD_S=${BENCH_HARD_S:-280}        # outer limit of the run; the report is rendered afterwards
RESULTS=${BENCH_OUT:-benchmarks/results}   # parent of the <device-label>/ folder
LOG=${OUT:-/tmp}/gpu.log
: > "$LOG"
say() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

SITE=/tmp/dpjax-bench-site
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
for dir in "${BENCH_WHEELS:-}" benchmarks/wheels wheels .whl; do
  if [ -n "$dir" ] && compgen -G "$dir/*.whl" > /dev/null; then
    say "installing wheels from $dir: $(cd "$dir" && ls *.whl | tr '\n' ' ')"
    pipi() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
    if ! pipi "$dir"/*.whl >> "$LOG" 2>&1; then
      say "installing them together failed; one by one (what fails is skipped)"
      for w in "$dir"/*.whl; do pipi "$w" >> "$LOG" 2>&1 || say "could not install $(basename "$w")"; done
    fi
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    break
  fi
done

if ! $PY -c "import dpjax" >> "$LOG" 2>&1; then
  say "dpjax does not import (dp-accounting missing? run benchmarks/fetch_wheels.sh and carry benchmarks/wheels)"
  tail -5 "$LOG"
  exit 3
fi
for m in jax_privacy torch opacus; do
  $PY -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null | tee -a "$LOG" \
    || say "$m not importable: that peer will be skipped"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$LOG"
LABEL=${BENCH_LABEL:-$($PY -c "from benchmarks.environment import device_label; print(device_label())" 2>> "$LOG")}
case "$LABEL" in
  gpu-*|cuda-*) say "results folder $RESULTS/$LABEL" ;;
  *) say "WARNING: JAX sees no GPU (device label '$LABEL'); running anyway" ;;
esac

say "python -m benchmarks.run --device-label $LABEL (budget ${BUDGET_S}s) $*"
timeout -k 10 "$HARD_S" $PY -m benchmarks.run --out "$RESULTS" --device-label "$LABEL" --time-budget-s "$BUDGET_S" \
  --reserve-s 130 --worker-timeout-s 240 "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "benchmarks.run exited with $rc"

# Re-render: a run stopped part-way leaves JSON and Markdown but maybe no plots.
dir=$RESULTS/$LABEL
if [ -f "$dir/results.json" ]; then
  $PY -m benchmarks.report "$dir" >> "$LOG" 2>&1 || say "report re-render failed"
  if [ -n "${OUT:-}" ]; then
    cp "$dir"/results.json "$dir"/results.md "$OUT"/ 2>/dev/null
    cp "$dir"/*.png "$OUT"/ 2>/dev/null
  fi
  cat "$dir/results.md"
fi
# The single-device number of the data-parallel step (issue: data-parallel DP),
# for comparison with the CPU virtual-device scaling table.
say "parallel_scaling on one GPU"
JAX_PLATFORMS=cuda timeout -k 5 60 $PY -m benchmarks.parallel_scaling --devices 1 --steps 5 --repeats 3 \
  --out "$RESULTS/$LABEL" 2>&1 | tee -a "$LOG" || say "parallel_scaling failed"
[ -n "${OUT:-}" ] && cp "$RESULTS/$LABEL"/parallel_scaling.* "$OUT"/ 2>/dev/null
# The fast path's memory/speed knob on the ANCHORS CNN at batch 1024
# (clipped_grad(keep_fraction=0 / 0.25 / inf)).
say "fast_variants: keep_fraction sweep, CNN batch 1024"
timeout -k 5 60 $PY -m benchmarks.fast_variants --batches 1024 --steps 10 --out "$RESULTS/$LABEL" 2>&1 | tee -a "$LOG" \
  || say "fast_variants failed"
[ -n "${OUT:-}" ] && cp "$RESULTS/$LABEL"/fast_variants.json "$OUT"/ 2>/dev/null
# Fast vs vmap at the GPU's default (TF32) matmul precision and at "highest".
say "precision_check"
timeout -k 5 40 $PY -m benchmarks.precision_check --out "$RESULTS/$LABEL" 2>&1 | tee -a "$LOG" \
  || say "precision_check failed"
[ -n "${OUT:-}" ] && cp "$RESULTS/$LABEL"/precision_check.json "$OUT"/ 2>/dev/null
# The real-model zoo (GPT-2 tied, BERT, ViT, ResNet-18/GroupNorm, nn.scan, nn.remat,
# LoRA): vmap, fast and auto against non-private, at the bench sizes with GPU batches.
say "zoo: the real-model zoo"
timeout -k 5 150 $PY -m benchmarks.zoo --batch 64 --steps 5 --out "$RESULTS/$LABEL" 2>&1 | tee -a "$LOG" \
  || say "zoo failed"
[ -n "${OUT:-}" ] && cp "$RESULTS/$LABEL"/zoo.* "$OUT"/ 2>/dev/null
say "done"
exit "$rc"
