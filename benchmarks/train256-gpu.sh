#!/usr/bin/env bash
# infinity-mini-256 on a lent GPU, in one command of at most ~10 minutes (a session's device time is
# 15 minutes, start included):
#
#   1. train: infinity-mini's weights continued on the 13-scale 256x256 schedule
#      (training/configs/mini256.yaml, --init stagevar/toy/weights; no VAE phase) for
#      STAGEVAR_TRAIN_MINUTES (7) on the GPU, larger batches, 12 processes rendering the scenes;
#   2. score the EMA weights with the evaluator on held-out prompts (STAGEVAR_TRAIN_EVAL_N x 2 seeds);
#   3. pack the weights directory into parts of 15 MiB (what comes back from a lent machine is at
#      most 8 files of 16 MiB each).
#
# Run from the repository root; nothing needs installing (PYTHONPATH=.; torch, numpy, pyyaml,
# safetensors, Pillow; scipy for step 2, tqdm optional):
#
#   OUT=out/train256 bash benchmarks/train256-gpu.sh
#
# Under $OUT: train.log, log.jsonl (the run's metrics), heldout.jsonl + eval.log (step 2) and
# weights.tar.part-aa, -ab, ... Unpack and use the weights with
#
#   cat $OUT/weights.tar.part-* | tar -xf - -C stagevar/toy/weights-256
#   stagevar evaluate --model infinity-mini-256
#
# A later GPU session continues from the weights a previous one brought back:
# STAGEVAR_TRAIN_INIT=stagevar/toy/weights-256 (same architecture and schedule: a plain warm start).
# CPU dry run (a few steps; the whole script in a few minutes):
#
#   STAGEVAR_TRAIN_DEVICE=cpu STAGEVAR_TRAIN_WORKERS=0 STAGEVAR_TRAIN_EVAL_N=2 \
#     STAGEVAR_TRAIN_EXTRA="--max-steps 2 --set train.batch=1 --set train.short_batch=1" \
#     OUT=/tmp/train256-dry bash benchmarks/train256-gpu.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-out/train256}"
DEVICE="${STAGEVAR_TRAIN_DEVICE:-cuda}"
MINUTES="${STAGEVAR_TRAIN_MINUTES:-7}"
INIT="${STAGEVAR_TRAIN_INIT:-stagevar/toy/weights}"
WORKERS="${STAGEVAR_TRAIN_WORKERS:-12}"
EVAL_N="${STAGEVAR_TRAIN_EVAL_N:-60}"
RUN="${STAGEVAR_TRAIN_RUN:-$OUT/run}"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# shellcheck disable=SC2206
EXTRA=(${STAGEVAR_TRAIN_EXTRA:-})
FAILED=0

echo "== train ${MINUTES} min on $DEVICE from $INIT"
timeout --kill-after=15 $(( MINUTES * 60 + 120 )) "$PY" -m training --config training/configs/mini256.yaml \
  --init "$INIT" --out "$RUN" --device "$DEVICE" --max-minutes "$MINUTES" --workers "$WORKERS" --quiet \
  --set train.batch=64 --set train.short_batch=128 --set train.ckpt_minutes=2 "${EXTRA[@]}" >"$OUT/train.log" 2>&1 \
  || { echo "train failed (exit $?): see train.log"; FAILED=$((FAILED + 1)); }
tail -n 3 "$OUT/train.log"
[ -f "$RUN/log.jsonl" ] && cp "$RUN/log.jsonl" "$OUT/log.jsonl"

if [ -f "$RUN/final/config.json" ]; then
  echo "== held-out evaluator score ($EVAL_N prompts x 2 seeds)"
  timeout --kill-after=15 150 "$PY" -m training --evaluate "$RUN/final" --split heldout --n "$EVAL_N" --seeds 0 1 \
    --device "$DEVICE" --json "$OUT/heldout.jsonl" >"$OUT/eval.log" 2>&1 \
    || { echo "evaluation failed (exit $?): see eval.log"; FAILED=$((FAILED + 1)); }
  tail -n 1 "$OUT/eval.log"
  tar -C "$RUN/final" -cf - . | split -b 15m - "$OUT/weights.tar.part-"
  ls -l "$OUT"/weights.tar.part-*
else
  echo "no final weights: nothing packed"
  FAILED=$((FAILED + 1))
fi
# only the files listed above come back; the run directory (checkpoint) stays on the machine
[ "$RUN" = "$OUT/run" ] && rm -rf "$RUN"
exit "$FAILED"
