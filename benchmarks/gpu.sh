#!/usr/bin/env bash
# Speed benchmark on a lent GPU (H100 / H200): Infinity-2B at 1024x1024, bfloat16, batch 1,
# seeded random weights (speed does not depend on the weights): the full model vs the StageVAR
# paper's hand-set policy vs the shipped infinity-2b policies (policies/infinity-2b*.yaml, when
# present) vs FastVAR (Infinity code) - one table, logs under $OUT.
#
# Run from the repository root; the package need not be installed (PYTHONPATH=.), and only torch,
# numpy and pyyaml are needed (--no-quality --no-plot: no scipy, no matplotlib):
#
#   OUT=out/gpu bash benchmarks/gpu.sh
#
# Budget: about 8 minutes including model construction and warm-up (the run is killed at
# STAGEVAR_BENCH_TIMEOUT seconds, default 450). Overrides, e.g. for a CPU dry run:
#
#   STAGEVAR_BENCH_MODEL=infinity-tiny STAGEVAR_BENCH_DEVICE=cpu STAGEVAR_BENCH_DTYPE=bfloat16 \
#     OUT=/tmp/gpu-dry bash benchmarks/gpu.sh
#
# STAGEVAR_BENCH_MODEL (infinity-2b), STAGEVAR_BENCH_DEVICE (cuda), STAGEVAR_BENCH_DTYPE (bfloat16),
# STAGEVAR_BENCH_REPEATS (3), STAGEVAR_BENCH_BATCH (1), STAGEVAR_BENCH_BASELINES (paper,fastvar),
# STAGEVAR_BENCH_TIMEOUT (450), STAGEVAR_BENCH_EXTRA (more arguments for stagevar.bench).
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL="${STAGEVAR_BENCH_MODEL:-infinity-2b}"
DEVICE="${STAGEVAR_BENCH_DEVICE:-cuda}"
DTYPE="${STAGEVAR_BENCH_DTYPE:-bfloat16}"
REPEATS="${STAGEVAR_BENCH_REPEATS:-3}"
BATCH="${STAGEVAR_BENCH_BATCH:-1}"
BASELINES="${STAGEVAR_BENCH_BASELINES:-paper,fastvar}"
LIMIT="${STAGEVAR_BENCH_TIMEOUT:-450}"
OUT="${OUT:-out/gpu-bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'n/a') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
  echo "model: $MODEL  device: $DEVICE  dtype: $DTYPE  batch: $BATCH  repeats: $REPEATS  baselines: $BASELINES"
  "$PY" -c 'import sys, torch, numpy, yaml; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__, "pyyaml", yaml.__version__); print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true; fi
} 2>&1 | tee "$OUT/env.txt"

POLICY_ARGS=()
shopt -s nullglob
for f in policies/"$MODEL"*.yaml; do
  POLICY_ARGS+=(--policy "$f")
done
shopt -u nullglob
if [ "${#POLICY_ARGS[@]}" -eq 0 ]; then
  # no shipped policy for this model: point discovery at an empty directory so nothing else is picked up
  mkdir -p "$OUT/no-policies"
  POLICY_ARGS=(--policies-dir "$OUT/no-policies")
  echo "no policies/$MODEL*.yaml: measuring full + baselines only" | tee -a "$OUT/env.txt"
fi

# shellcheck disable=SC2086
set +e
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=20 "$LIMIT" "$PY" -m stagevar.bench \
  --model "$MODEL" --random-weights --device "$DEVICE" --dtype "$DTYPE" \
  --batch-size "$BATCH" --repeats "$REPEATS" --prompts "$BATCH" \
  --baselines "$BASELINES" "${POLICY_ARGS[@]}" \
  --no-quality --no-plot --out "$OUT" ${STAGEVAR_BENCH_EXTRA:-} \
  >"$OUT/stdout.md" 2> >(tee "$OUT/bench.log" >&2)
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "stagevar.bench failed (exit $rc; 124/137 = over the ${LIMIT}s limit); see $OUT/bench.log" >&2
  exit "$rc"
fi
echo
cat "$OUT/bench.md"
