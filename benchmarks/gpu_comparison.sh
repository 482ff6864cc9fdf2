#!/usr/bin/env bash
# Issue 13 on one GPU, one script, everything concurrent, every run under a timeout (under 7 minutes in all):
#   vctk-mini        5 seeds x {SQ plain, SQ calibrated, VQ 0.999, VQ 0.99, VQ 0.99 calibrated}
#   zerospeech-mini  3 seeds x the same
# 40 runs of `sqaudio train` + `sqaudio evaluate` (test split), at most JOBS_VCTK + JOBS_ZS (default 15 + 9 = 24)
# processes at a time, OMP_NUM_THREADS=1 each, on one CUDA device.
#
#   OUT=/some/dir bash benchmarks/gpu_comparison.sh        (from anywhere inside the repository)
#
# Inputs: prepared feature stores VCTK_FEATS (default .gpu/vctk-mini) and ZS_FEATS (.gpu/zs-mini); float16 .npy
# files in them are converted back to float32 in place first (idempotent). Wheels in .whl/ are installed to
# /tmp/site when present. Knobs (environment): STEPS (budget per run, every recipe scaled alike, calibration
# steps and lr milestones with it; default: the recipes' 10000), DEADLINE (seconds after which no run
# starts and running ones stop; default 380), RUN_TIMEOUT (seconds per run; default 360), MODELS, DEVICE (cpu for
# a smoke test: DEVICE=cpu STEPS=10 JOBS_VCTK=2 JOBS_ZS=2 MODELS="sq_calibrated vq").
# Writes to $OUT (default ./gpu_comparison_out):
#   vctk.json, zerospeech.json   every run's test result + last training row, means, the acceptance check
#   vctk.txt, zerospeech.txt     the printed tables
#   summary.txt                  both acceptance lines, timing
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_comparison_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
VCTK_FEATS=${VCTK_FEATS:-.gpu/vctk-mini}
ZS_FEATS=${ZS_FEATS:-.gpu/zs-mini}
JOBS_VCTK=${JOBS_VCTK:-15}
JOBS_ZS=${JOBS_ZS:-9}
DEADLINE=${DEADLINE:-380}
RUN_TIMEOUT=${RUN_TIMEOUT:-360}
WORK=${WORK:-/tmp/sqaudio-issue13}
MODELS=${MODELS:-"sq sq_calibrated vq vq_decay099 vq_decay099_calibrated"}
DEVICE=${DEVICE:-cuda}
STEPS_ARG=()
[ -n "${STEPS:-}" ] && STEPS_ARG=(--steps "$STEPS")
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi -L || true
$PY - "$VCTK_FEATS" "$ZS_FEATS" <<'PY'
import pathlib, sys
import numpy as np
for root in sys.argv[1:]:
    n = 0
    for p in pathlib.Path(root).rglob("*.npy"):
        a = np.load(p)
        if a.dtype != np.float32:
            np.save(p, a.astype(np.float32)); n += 1
    print(f"{root}: {n} feature files converted to float32")
PY

run() {  # corpus feats jobs seeds...
  local corpus=$1 feats=$2 jobs=$3; shift 3
  timeout $((DEADLINE + 60)) $PY benchmarks/vctk_mini_comparison.py --corpus "$corpus" --feats "$feats" \
    --work "$WORK/$corpus" --seeds "$@" --jobs "$jobs" --models $MODELS --option sq_calibrated --no-branch --device "$DEVICE" \
    --timeout "$RUN_TIMEOUT" --deadline "$DEADLINE" --json "$OUT/$corpus.json" "${STEPS_ARG[@]}" \
    > "$OUT/$corpus.txt" 2>&1
  echo "$corpus: exit $? after $(( $(date +%s) - start )) s"
}
run vctk "$VCTK_FEATS" "$JOBS_VCTK" 1234 1 2 3 4 &
run zerospeech "$ZS_FEATS" "$JOBS_ZS" 1234 1 2 &
( sleep 90; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv > "$OUT/nvidia-smi.txt" 2>&1 ) &
wait
{
  echo "wall: $(( $(date +%s) - start )) s, STEPS=${STEPS:-recipe} DEADLINE=$DEADLINE"
  for corpus in vctk zerospeech; do
    echo "== $corpus"
    grep -v "^FAILED\|^|---" "$OUT/$corpus.txt" | grep "mean +- std\|steps per run\|vs best VQ" || tail -5 "$OUT/$corpus.txt"
    grep -c "^FAILED" "$OUT/$corpus.txt" | sed 's/^/failed runs: /'
  done
} | tee "$OUT/summary.txt"
