#!/usr/bin/env bash
# GPU checks, one unattended run on a fresh machine (docs/gpu.md): installs what the Python lacks from .whl/,
# a preflight, inputs it makes itself (a synthetic store, generated speech), then the training speed of the
# reference recipe in bf16 and fp32, VQ-EMA and utterance mode (steps/s, the data path's share, host syncs
# counted and the first located), vocoder training speed and syncs, CUDA bit-exactness of a rerun and of a
# resume, reconstruct's real-time factor, DDP. Each part runs under `timeout` (all of them within
# GPU_CHECK_BUDGET seconds), prints its result and is recorded in OUTDIR/gpu_check.json as soon as it ends; a
# failed part does not stop the others; the exit code is 1 when any part failed or ran out of time.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]                 OUTDIR: default $OUT, else ./gpu_check_out
#   GPU_CHECK_CPU=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh OUTDIR        the CPU smoke mode
#
# OUTDIR gets gpu_check.json (every part: status, seconds, exit code, results; rewritten atomically after each
# part) and log.txt (everything printed). Environment: PYTHON (default python3); GPU_CHECK_CPU=1 (every part
# on the CPU with tiny sizes; CUDA-only fields read "skipped: cpu"); GPU_CHECK_BUDGET (seconds for all parts:
# default 345; on the CPU 1800, and every part's limit x4); GPU_CHECK_PARTS (only these parts, e.g. "install preflight vq");
# GPU_CHECK_SQ_RECIPE, GPU_CHECK_VQ_RECIPE (default vctk/sqvae_gauss4, vctk/vqvae_ema); GPU_CHECK_SITE (where
# .whl/ is installed; default a temporary folder).
set -euo pipefail

OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
CPU=${GPU_CHECK_CPU:-0}
ONLY=${GPU_CHECK_PARTS:-}
SQ=${GPU_CHECK_SQ_RECIPE:-vctk/sqvae_gauss4}
VQ=${GPU_CHECK_VQ_RECIPE:-vctk/vqvae_ema}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SITE=${GPU_CHECK_SITE:-$WORK/site}
JSON=$OUTDIR/gpu_check.json
FAILED=0
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$CPU" = 1 ]; then
  MODE=cpu BUDGET=${GPU_CHECK_BUDGET:-1800} DEV=cpu THREADS=1 CPU_FLAG=(--cpu) SLOW=4  # time limits x SLOW
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # a shared machine: more threads only wait for each other
  TINY=(--set model.speech.channels=32 --set model.speech.rnn_hidden=16 --set model.speech.speaker_dim=8
        --set quantizer.codebook_size=32 --set quantizer.dim=16 --set data.batch_size=4)
  LONG=(--steps 3 --warmup 1) SHORT=(--steps 2 --warmup 1) UTT=(--steps 2 --warmup 1 --set data.max_frames=100)
  VOC=(--recipe tiny --steps 2 --warmup 1) EXACT=(--recipe vctk/mini_sqvae_gauss4 --steps 4)
  RECON=(--seconds 2 --threads 1) DDP=(--recipe vctk/mini_sqvae_gauss4 --steps 6)
else
  MODE=cuda BUDGET=${GPU_CHECK_BUDGET:-345} DEV=cuda THREADS=4 CPU_FLAG=() TINY=() SLOW=1
  LONG=(--steps 200 --warmup 20) SHORT=(--steps 100 --warmup 10) UTT=(--steps 40 --warmup 5)
  VOC=(--recipe hifigan --steps 20 --warmup 3) EXACT=(--recipe "$SQ" --steps 40)
  RECON=(--seconds 60 --threads 4) DDP=(--recipe vctk/mini_sqvae_gauss4 --steps 30)
fi
DEADLINE=$((SECONDS + BUDGET))

part() {  # NAME LIMIT COMMAND...: one part under `timeout`, recorded when it ends; a failure is counted, not fatal
  local name=$1 limit=$(($2 * SLOW)) rc=0 status=ok start=$SECONDS left
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  left=$((DEADLINE - SECONDS))
  ((limit <= left)) || limit=$left
  echo; echo "== $name (at most $limit s)"
  if ((limit < 5)); then
    echo "not started: the budget of $BUDGET s is spent" | tee "$WORK/$name.log"
    rc=124
  else
    timeout -k 10 "$limit" "$@" --json "$WORK/$name.json" 2>&1 | tee "$WORK/$name.log" || rc=$?
  fi
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  [ "$status" = ok ] || FAILED=$((FAILED + 1))
  "$PY" benchmarks/gpu_check.py record "$JSON" "$name" "$status" $((SECONDS - start)) "$rc" \
    "$WORK/$name.json" "$WORK/$name.log" || FAILED=$((FAILED + 1))
}

main() {
  echo "gpu_check ($MODE) in $ROOT with $PY; results: $JSON; budget $BUDGET s"
  if [ "$MODE" = cuda ] && command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; fi
  "$PY" benchmarks/gpu_check.py begin "$JSON" "$MODE" "$BUDGET"
  local train=("$PY" benchmarks/train_speed.py --data "$WORK/inputs/train" --device "$DEV" --threads "$THREADS"
               "${TINY[@]}")
  part install 60 "$PY" benchmarks/gpu_check.py install --site "$SITE" --wheels .whl
  part preflight 60 "$PY" benchmarks/gpu_check.py preflight "${CPU_FLAG[@]}"
  part inputs 90 "$PY" benchmarks/gpu_check.py inputs "$WORK/inputs" "${CPU_FLAG[@]}"
  part train_bf16 90 "${train[@]}" --recipe "$SQ" --amp bf16 "${LONG[@]}"
  part train_fp32 60 "${train[@]}" --recipe "$SQ" --amp none "${SHORT[@]}"
  part vq 60 "${train[@]}" --recipe "$VQ" --amp bf16 "${SHORT[@]}"
  part utterance 75 "${train[@]}" --recipe "$SQ" --amp bf16 --set data.mode=utterance "${UTT[@]}"
  part vocoder 75 "$PY" benchmarks/vocoder_speed.py --train-step --data "$WORK/inputs/speech/store" --device "$DEV" \
    --threads "$THREADS" "${VOC[@]}"
  part exactness 90 env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PY" benchmarks/gpu_check.py exactness \
    --data "$WORK/inputs/train" "${EXACT[@]}" "${TINY[@]}" "${CPU_FLAG[@]}"
  part reconstruct 75 "$PY" benchmarks/reconstruct_speed.py --device "$DEV" --vocoder hifigan griffin-lim \
    "${RECON[@]}"
  part ddp 75 "$PY" benchmarks/gpu_check.py ddp --data "$WORK/inputs/train" "${DDP[@]}" "${TINY[@]}" "${CPU_FLAG[@]}"
  "$PY" benchmarks/gpu_check.py finish "$JSON" "$SECONDS" || FAILED=$((FAILED + 1))
  echo; echo "gpu_check finished in $SECONDS s: $FAILED part(s) failed or ran out of time; results in $JSON"
  ((FAILED == 0))
}

: > "$OUTDIR/log.txt"
main 2>&1 | tee -a "$OUTDIR/log.txt"
