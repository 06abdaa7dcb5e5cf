#!/usr/bin/env bash
# Everything measured on a lent GPU (H100 / H200), in one command of at most ~9 minutes:
#
#   1. engine check: eager vs static vs graphs give the same codes and images (tiny models, and
#      Infinity-2B at batch 1), bit for bit, on the capture and on a replay;
#   2. Infinity-2B, 1024x1024, bfloat16, random weights (speed does not depend on the weights),
#      batch 1: eager vs static vs graphs for the full model, the StageVAR paper policy, FastVAR's
#      plan and a paper-like plan fitted to 3x by measurement on graphs; per-scale device times,
#      the first image's latency (capture included), the VAE in float32 vs bfloat16;
#   3. the same at batch 8 (throughput), with the batch-1 fitted plan;
#   4. stagevar profile of the full model on graphs and on eager: ops, launches and host syncs per
#      image, device time per scale.
#
# Run from the repository root; nothing needs installing (PYTHONPATH=.; torch, numpy, pyyaml):
#
#   OUT=out/gpu bash benchmarks/gpu.sh
#
# Logs and JSON go under $OUT; a summary is printed last. A step that fails or runs over its time
# limit is reported and the others still run (exit status: the number of failed steps). CPU dry
# run with a tiny model:
#
#   STAGEVAR_BENCH_MODEL=infinity-tiny STAGEVAR_BENCH_DEVICE=cpu STAGEVAR_BENCH_DTYPE=float32 \
#     OUT=/tmp/gpu-dry bash benchmarks/gpu.sh
#
# STAGEVAR_BENCH_MODEL (infinity-2b), STAGEVAR_BENCH_DEVICE (cuda), STAGEVAR_BENCH_DTYPE (bfloat16),
# STAGEVAR_BENCH_REPEATS (5), STAGEVAR_BENCH_BUDGET (3x), STAGEVAR_BENCH_BATCH (8: the throughput step's
# batch), STAGEVAR_BENCH_LARGE_CHECK (1: the engine check also runs the model itself), STAGEVAR_BENCH_CHECK_MODELS
# (infinity-tiny,var-tiny: the small models the engine check runs), STAGEVAR_BENCH_EXTRA
# (more bench arguments), STAGEVAR_BENCH_SCALE (1.0: multiplies every step's time limit).
set -uo pipefail

cd "$(dirname "$0")/.."
MODEL="${STAGEVAR_BENCH_MODEL:-infinity-2b}"
DEVICE="${STAGEVAR_BENCH_DEVICE:-cuda}"
DTYPE="${STAGEVAR_BENCH_DTYPE:-bfloat16}"
REPEATS="${STAGEVAR_BENCH_REPEATS:-5}"
BUDGET="${STAGEVAR_BENCH_BUDGET:-3x}"
BATCH="${STAGEVAR_BENCH_BATCH:-8}"
FEW=$(( REPEATS < 3 ? REPEATS : 3 ))          # repeats of the batch step and the profiles
LARGE=(--large "$MODEL" --large-plans full,paper)
[ "${STAGEVAR_BENCH_LARGE_CHECK:-1}" = "1" ] || LARGE=()
SCALE="${STAGEVAR_BENCH_SCALE:-1.0}"
OUT="${OUT:-out/gpu-bench}"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
if [ "$DEVICE" = "cpu" ]; then ENGINES="eager,static"; else ENGINES="eager,static,graphs"; fi
FAILED=0
SUMMARY=()

limit() { "$PY" -c "print(int($1 * $SCALE))"; }

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name="$1" secs; secs=$(limit "$2"); shift 2
  local t0=$SECONDS
  echo "== $name (limit ${secs}s): $*" | tee -a "$OUT/steps.log"
  timeout --kill-after=15 "$secs" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
  local rc=$?
  local msg="$name: exit $rc in $((SECONDS - t0))s"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && msg="$msg (over the ${secs}s limit)"
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1)) && tail -n 5 "$OUT/$name.log" >&2
  SUMMARY+=("$msg")
  echo "$msg" | tee -a "$OUT/steps.log"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'n/a') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
  echo "model: $MODEL  device: $DEVICE  dtype: $DTYPE  repeats: $REPEATS  budget: $BUDGET  engines: $ENGINES"
  "$PY" -c 'import sys, torch, numpy, yaml; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__, "pyyaml", yaml.__version__); print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true; fi
} 2>&1 | tee "$OUT/env.txt"

# an empty policies directory: the shipped infinity-2b file is the paper plan, benched as a baseline
mkdir -p "$OUT/no-policies"
BENCH=("$PY" -m calibrate.bench --model "$MODEL" --random-weights --device "$DEVICE" --dtype "$DTYPE"
       --engine "$ENGINES" --baselines paper,fastvar --policies-dir "$OUT/no-policies" --no-quality --no-plot)

step engine-check 100 "$PY" benchmarks/engine_check.py --device "$DEVICE" --dtype "$DTYPE" "${LARGE[@]}" \
  --models "${STAGEVAR_BENCH_CHECK_MODELS:-infinity-tiny,var-tiny}" --out "$OUT/engine-check"
# shellcheck disable=SC2086
step bench-b1 190 "${BENCH[@]}" --batch-size 1 --prompts 1 --repeats "$REPEATS" --fit-budget "$BUDGET" --compare-vae \
  --out "$OUT/b1" ${STAGEVAR_BENCH_EXTRA:-}
FIT=()
[ -f "$OUT/b1/fitted-$BUDGET.yaml" ] && FIT=(--policy "$OUT/b1/fitted-$BUDGET.yaml")
# shellcheck disable=SC2086
step bench-b8 150 "${BENCH[@]}" --batch-size "$BATCH" --prompts "$BATCH" --repeats "$FEW" --no-memory --sequential "${FIT[@]}" \
  --out "$OUT/b8" ${STAGEVAR_BENCH_EXTRA:-}
for engine in ${ENGINES//,/ }; do
  [ "$engine" = "static" ] && continue
  step "profile-$engine" 60 "$PY" -m stagevar.profile --model "$MODEL" --random-weights --device "$DEVICE" --dtype "$DTYPE" \
    --engine "$engine" --repeats "$FEW" --json
done

echo
echo "## engine check"; cat "$OUT/engine-check.out" 2>/dev/null | tail -n 30
for b in b1 b8; do
  echo; echo "## bench $b"; [ -f "$OUT/$b/bench.md" ] && sed -n '/^| method | kind/,/^$/p' "$OUT/$b/bench.md"
done
echo; echo "## profiles"
for f in "$OUT"/profile-*.out; do
  [ -s "$f" ] && "$PY" - "$f" <<'PYEOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"{r['engine']}: {r['seconds_per_image']:.4f} s/image, first generation {r['first_generation_s']:.3f} s, "
      f"{r['ops_per_image']:.0f} ops/image ({r['launching_ops_per_image']:.0f} launching), "
      f"{r['host_syncs_per_image']:.0f} host syncs/image; device ms per scale: "
      + " ".join("-" if s["device_s"] is None else f"{s['device_s'] * 1e3:.1f}" for s in r["per_scale"]))
PYEOF
done
echo; echo "## steps"; printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
