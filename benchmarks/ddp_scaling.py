"""Steps per second of `sqaudio train --devices N` (DDP: gloo on CPU, NCCL on GPU) at the same global batch,
measured inside the run (start-up, the first checkpoint and teardown excluded): the time between the
appearance of two checkpoints, `--every` steps apart, after a warm-up checkpoint.

The store is synthetic (the real format, random log-mels; see train_speed.py) unless --data is given.

    .venv/bin/python benchmarks/ddp_scaling.py [--device cpu] [--steps 30] [--recipe vctk/mini_sqvae_gauss4]
    python3 benchmarks/ddp_scaling.py --device cuda --recipe vctk/sqvae_gauss4 --steps 600 --json $OUT/ddp.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(store: Path, out: Path, nproc: int, steps: int, recipe: str, device: str, extra: list[str]) -> float:
    """Steps per second between the checkpoint at steps // 3 and the one at steps - steps // 3."""
    first, last = steps // 3, steps - steps // 3
    every = last - first
    cmd = [sys.executable, "-m", "sqaudio", "train", recipe, "--data", str(store), "--out", str(out), "--quiet",
           "--device", device, "--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={every}",
           "--set", "train.keep_last=0", "--set", f"train.log_every={every}", "--devices", str(nproc),
           *[a for o in extra for a in ("--set", o)]]
    threads = max(1, (os.cpu_count() or 2) // (2 * nproc)) if device == "cpu" else 2
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        for step in (s for s in range(every, steps + 1, every) if s not in seen):
            if (out / f"checkpoint-{step}.pt").exists():
                seen[step] = time.perf_counter()
        time.sleep(0.005)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}): {' '.join(cmd)}")
    a, b = every, 2 * every if 2 * every <= steps else None
    if b is None or a not in seen or b not in seen:
        raise SystemExit("too few steps to time between two checkpoints: raise --steps")
    return (b - a) / (seen[b] - seen[a])


def main() -> None:
    from train_speed import synthetic_store

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--recipe", default="vctk/mini_sqvae_gauss4")
    parser.add_argument("--data", type=Path, help="prepared features (default: synthetic)")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override, e.g. train.amp=bf16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.data or synthetic_store(Path(tmp) / "store")
        rates = {n: run(store, Path(tmp) / f"run{n}", n, args.steps, args.recipe, args.device, args.set)
                 for n in (1, 2)}
    machine = f"{os.cpu_count()} CPU cores" if args.device == "cpu" else args.device
    print(f"{args.recipe} on {machine}, the recipe's global batch, {args.steps} steps")
    for n, rate in rates.items():
        print(f"  {n} process(es): {rate:.2f} steps/s")
    print(f"  scaling 2 vs 1: {rates[2] / rates[1]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"recipe": args.recipe, "device": args.device, "steps": args.steps,
                                         "steps_per_s": rates, "scaling_2_vs_1": rates[2] / rates[1]}, indent=2))


if __name__ == "__main__":
    main()
