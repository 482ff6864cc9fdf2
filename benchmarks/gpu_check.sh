#!/usr/bin/env bash
# GPU checks for issue 11, one short script (every step has a timeout: under 6 minutes in all on one H200).
# Run from anywhere inside the repository:   OUT=/some/dir bash benchmarks/gpu_check.sh
# Needs python3 with torch + CUDA, rich, typer, scipy, pyyaml, tensorboard, matplotlib, numpy; librosa and
# soundfile wheels in .whl/ are installed to /tmp/site when present. Writes to $OUT (default ./gpu_check_out):
#   log.txt                  everything printed below
#   train_speed_bf16.json    reference recipe (SQ-VAE IV, batch 52, 32+2 frames), bf16 autocast, DataLoader vs memory
#   train_speed_fp32.json    the same without autocast
#   ddp.json                 2 processes vs 1 on the same global batch (CUDA with >= 2 GPUs, else CPU/gloo)
#   resume.json              CUDA: rerun and interrupted+resumed vs straight, with and without train.deterministic
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)
nvidia-smi -L || true
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), '| GPUs:', torch.cuda.device_count())"

echo; echo "== 1/4 train_speed, reference recipe, bf16 autocast, 4 DataLoader workers (target >= 50 steps/s, data path < 5%)"
timeout 100 $PY benchmarks/train_speed.py --device cuda --amp bf16 --workers 4 --threads 4 --steps 250 --warmup 25 \
  --json "$OUT/train_speed_bf16.json"

echo; echo "== 2/4 train_speed, reference recipe, fp32"
timeout 60 $PY benchmarks/train_speed.py --device cuda --amp none --workers 4 --threads 4 --steps 100 --warmup 10 \
  --json "$OUT/train_speed_fp32.json"

echo; echo "== 3/4 DDP: torchrun-style 2 processes vs 1 on the same global batch"
if [ "$NGPU" -ge 2 ]; then
  timeout 100 $PY benchmarks/ddp_scaling.py --device cuda --recipe vctk/sqvae_gauss4 --steps 900 --json "$OUT/ddp.json"
else
  echo "skipped: only $NGPU GPU, and NCCL cannot place two ranks on one device (the CPU/gloo comparison is"
  echo "benchmarks/ddp_scaling.py --device cpu, which needs no GPU machine)"
fi

echo; echo "== 4/4 exactness on CUDA: rerun and 20 steps + --resume 20 against 40 straight steps (vctk/mini_sqvae_gauss4, bf16)"
CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 75 $PY - "$OUT/resume.json" <<'PYEOF'
import json, sys, tempfile
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from train_speed import synthetic_store
from sqaudio import checkpoint
from sqaudio.config import load_recipe
from sqaudio.training.sqvae import train

results = {}
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    store = synthetic_store(tmp / "store", n_speakers=4, n_utts=10)

    def run(name, steps, deterministic, resume=False):
        recipe = load_recipe("vctk/mini_sqvae_gauss4", [f"train.steps={steps}", "train.checkpoint_every=1000",
                                                         "train.log_every=10", f"train.deterministic={deterministic}"])
        train(recipe, store, tmp / name, resume=resume, device="cuda", quiet=True)
        return checkpoint.load(checkpoint.latest(tmp / name))["model"]

    for det in (False, True):
        a = run(f"a{det}", 40, det)
        b = run(f"b{det}", 40, det)
        run(f"c{det}", 20, det)
        c = run(f"c{det}", 40, det, resume=True)
        diff = lambda x, y: max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point())
        results[f"deterministic={det}"] = {"rerun_max_abs_diff": diff(a, b), "resume_max_abs_diff": diff(a, c),
                                           "rerun_bit_exact": all(torch.equal(a[k], b[k]) for k in a),
                                           "resume_bit_exact": all(torch.equal(a[k], c[k]) for k in a)}
        print(f"deterministic={det}: {results[f'deterministic={det}']}")
Path(sys.argv[1]).write_text(json.dumps(results, indent=2))
PYEOF

echo; echo "gpu_check finished in $(( $(date +%s) - start )) s; results in $OUT"
