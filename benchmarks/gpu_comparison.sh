#!/usr/bin/env bash
# SQ-VAE IV (plain, decoder-calibrated) vs VQ-VAE-EMA baselines on one GPU, unattended (docs/gpu.md):
#   vctk-mini        5 seeds x {SQ plain, SQ calibrated, VQ 0.999, VQ 0.99, VQ 0.99 calibrated}
#   zerospeech-mini  3 seeds x the same
# 40 runs of `sqaudio train` + `sqaudio evaluate` (test split) through benchmarks/vctk_mini_comparison.py, at most
# JOBS_VCTK + JOBS_ZS (default 15 + 9) processes at a time, one CPU thread each, every budget scaled to STEPS
# (calibration steps and lr milestones with it). Fits 7 minutes on one H100 with the defaults: no run starts
# after DEADLINE seconds and a run still training then is stopped with SIGTERM (it saves a checkpoint) and
# reported as cut; a finished evaluation may take up to 60 s more.
#
#   bash benchmarks/gpu_comparison.sh [OUTDIR]            OUTDIR: default $OUT, else ./gpu_comparison_out
#   DEVICE=cpu STEPS=4 SEEDS_VCTK=1234 SEEDS_ZS=1234 MODELS="sq vq" PYTHON=.venv/bin/python \
#     bash benchmarks/gpu_comparison.sh /tmp/cmp                                  the CPU smoke mode
#
# Inputs: STORES/vctk-mini.zip and STORES/zerospeech-mini.zip (STORES default .gpu), written by
# `benchmarks/gpu_stores.py pack` from ../shared/data; unpacked here into float32 stores. Wheels in .whl/ are
# installed when the Python lacks a module (benchmarks/gpu_check.py install). Environment: PYTHON (python3),
# STEPS (steps per run, default 1000: an estimate, not yet measured on a GPU; raise it when the JSON shows
# time to spare), DEADLINE (seconds from the start of the runs, default 300), RUN_TIMEOUT (seconds per run,
# default DEADLINE), JOBS_VCTK, JOBS_ZS, SEEDS_VCTK, SEEDS_ZS, MODELS, DEVICE (default cuda).
# OUTDIR gets vctk.json and zerospeech.json (every run: test metrics, or the error, or "cut" with the step
# it saved; means; the acceptance check; rewritten after every finished run), vctk.txt and zerospeech.txt
# (the tables), summary.txt, log.txt. Exit code 1 when a corpus's script failed.
set -euo pipefail

OUTDIR=${1:-${OUT:-gpu_comparison_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
STORES=${STORES:-.gpu}
STEPS=${STEPS:-1000}
DEADLINE=${DEADLINE:-300}
RUN_TIMEOUT=${RUN_TIMEOUT:-$DEADLINE}
JOBS_VCTK=${JOBS_VCTK:-15}
JOBS_ZS=${JOBS_ZS:-9}
SEEDS_VCTK=${SEEDS_VCTK:-1234 1 2 3 4}
SEEDS_ZS=${SEEDS_ZS:-1234 1 2}
MODELS=${MODELS:-sq sq_calibrated vq vq_decay099 vq_decay099_calibrated}
DEVICE=${DEVICE:-cuda}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_comparison.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

corpus() {  # NAME ARCHIVE JOBS SEEDS: unpack the store, run every model and seed, record the exit code
  local name=$1 archive=$2 jobs=$3 seeds=$4 rc=0
  local -a seed_list model_list
  read -ra seed_list <<< "$seeds"
  read -ra model_list <<< "$MODELS"
  "$PY" benchmarks/gpu_stores.py unpack "$archive" "$WORK/$name-store" || return 1
  timeout -k 30 $((DEADLINE + 150)) "$PY" benchmarks/vctk_mini_comparison.py --corpus "$name" \
    --feats "$WORK/$name-store" --work "$WORK/runs-$name" --seeds "${seed_list[@]}" --jobs "$jobs" \
    --models "${model_list[@]}" --option sq_calibrated --no-branch --device "$DEVICE" --steps "$STEPS" \
    --timeout "$RUN_TIMEOUT" --deadline "$DEADLINE" --json "$OUTDIR/$name.json" > "$OUTDIR/$name.txt" 2>&1 || rc=$?
  echo "$name: exit $rc after $SECONDS s"
  return "$rc"
}

main() {
  echo "gpu_comparison on $DEVICE with $PY: STEPS=$STEPS DEADLINE=$DEADLINE MODELS=$MODELS; results in $OUTDIR"
  if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; fi
  "$PY" benchmarks/gpu_check.py install --site "$WORK/site" --wheels .whl
  local failed=0 vctk zs smi=""
  corpus vctk "$STORES/vctk-mini.zip" "$JOBS_VCTK" "$SEEDS_VCTK" & vctk=$!
  corpus zerospeech "$STORES/zerospeech-mini.zip" "$JOBS_ZS" "$SEEDS_ZS" & zs=$!
  if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then  # the GPU's load once the runs are going
    (sleep 120; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv > "$OUTDIR/nvidia-smi.txt") \
      >/dev/null 2>&1 & smi=$!
  fi
  wait "$vctk" || failed=1
  wait "$zs" || failed=1
  [ -z "$smi" ] || kill "$smi" 2>/dev/null || true
  {
    echo "wall: $SECONDS s, STEPS=$STEPS DEADLINE=$DEADLINE DEVICE=$DEVICE"
    for name in vctk zerospeech; do
      echo "== $name"
      grep "mean +- std\|steps per run\|vs best VQ" "$OUTDIR/$name.txt" || tail -5 "$OUTDIR/$name.txt" || true
      echo "failed runs: $(grep -c '^FAILED' "$OUTDIR/$name.txt" || true), cut runs: $(grep -c '^CUT' "$OUTDIR/$name.txt" || true)"
    done
  } | tee "$OUTDIR/summary.txt"
  return "$failed"
}

: > "$OUTDIR/log.txt"
main 2>&1 | tee -a "$OUTDIR/log.txt"
