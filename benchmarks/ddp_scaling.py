"""Steps per second of `sqaudio train` with 1 and 2 processes (DDP, gloo on CPU / NCCL on GPU) at the same
global batch, measured from the same run's logs (start-up excluded: the time between two checkpoints).

    .venv/bin/python benchmarks/ddp_scaling.py [--device cpu|cuda] [--steps 30] [--recipe vctk/mini_sqvae_gauss4]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def run(store: Path, out: Path, nproc: int, steps: int, recipe: str, device: str) -> float:
    """Seconds per step between the first checkpoint (after warm-up) and the end."""
    warm = max(2, steps // 5)
    cmd = [sys.executable, "-m", "sqaudio", "train", recipe, "--data", str(store), "--out", str(out), "--quiet",
           "--device", device, "--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={warm}",
           "--set", "train.keep_last=100", "--devices", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    proc = subprocess.Popen(cmd, env=env)
    first = out / f"checkpoint-{warm}.pt"
    while not first.exists():
        if proc.poll() is not None:
            raise SystemExit(f"training failed: {cmd}")
        time.sleep(0.02)
    start = time.perf_counter()
    proc.wait()
    return (time.perf_counter() - start) / (steps - warm)


def main() -> None:
    from conftest import make_store

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--recipe", default="vctk/mini_sqvae_gauss4")
    parser.add_argument("--data", type=Path, help="prepared features (default: generated)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.data or make_store(Path(tmp) / "store", n_speakers=4, n_utts=12, seconds=2.0)
        rates = {n: 1.0 / run(store, Path(tmp) / f"run{n}", n, args.steps, args.recipe, args.device) for n in (1, 2)}
    machine = f"{os.cpu_count()} CPU cores" if args.device == "cpu" else args.device
    print(f"{args.recipe} on {machine}, global batch from the recipe")
    for n, rate in rates.items():
        print(f"  {n} process(es): {rate:.2f} steps/s")
    print(f"  scaling 2 vs 1: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
