"""SQ-VAE IV vs VQ-VAE-EMA baselines on vctk-mini at one small budget (real recordings).

Prepares the corpus (once), trains `vctk/mini_sqvae_gauss4` and each baseline of `--baselines` for every seed
(one process per run, one thread each, `--jobs` at a time; finished runs are skipped, cut-off runs resumed),
evaluates each on the test split and prints test mel-MSE (dB^2), perplexity and used codes per seed and as
mean +- std, then, per baseline, whether SQ-VAE IV has the lower MSE and the higher perplexity on average.
Baselines (docs/training.md): textbook objective with EMA decay 0.999 (`vq`) or 0.99 (`vq_decay099`), and
the MLE-sigma objective with decay 0.999 (`vq_mle_sigma`).

    .venv/bin/python benchmarks/vctk_mini_comparison.py [--data ../shared/data/vctk-mini] [--work runs/vctk-mini]
        [--seeds 1234 1 2] [--jobs 2] [--baselines vq vq_decay099 vq_mle_sigma] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from sqaudio.config import load_recipe, to_dict

MODEL = ("SQ-VAE IV", "vctk/mini_sqvae_gauss4")
BASELINES = {"vq": ("VQ-VAE-EMA textbook 0.999", "vctk/mini_vqvae_ema"),
             "vq_decay099": ("VQ-VAE-EMA textbook 0.99", "vctk/mini_vqvae_ema_decay099"),
             "vq_mle_sigma": ("VQ-VAE-EMA MLE-sigma 0.999", "vctk/mini_vqvae_ema_mle_sigma")}
METRICS = ("mel_mse_db2", "perplexity", "used_codes")


def sqaudio(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sqaudio", *args], check=True, env=env)


def run_one(feats: Path, run: Path, recipe: str, seed: int, steps: int, device: list[str]) -> dict:
    """Train (or resume, or skip) one run and evaluate its final checkpoint on the test split."""
    result = run / "eval-test.json"
    saved = run / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text())["quantizer"] != to_dict(load_recipe(recipe).quantizer):
        sys.exit(f"{run} was trained with another quantizer config than {recipe} now has; choose another --work")
    if not (run / f"checkpoint-{steps}.pt").exists():
        resume = ["--resume"] if run.is_dir() and any(run.glob("checkpoint-*.pt")) else []
        sqaudio("train", recipe, "--data", str(feats), "--out", str(run), "--quiet", *resume, *device,
                "--set", f"train.seed={seed}")
    if not result.exists() or json.loads(result.read_text()).get("step") != steps:
        sqaudio("evaluate", str(run), "--data", str(feats), "--json", str(result), *device)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/vctk-mini", help="raw vctk-mini (VCTK 0.92 layout)")
    parser.add_argument("--work", default="runs/vctk-mini", help="features and runs go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    args = parser.parse_args()
    recipes = dict([MODEL] + [BASELINES[b] for b in args.baselines])
    device = ["--device", args.device] if args.device else []

    work = Path(args.work)
    feats = work / "feats"
    if not (feats / "manifest.jsonl").exists():
        sqaudio("prepare", args.data, str(feats))
    steps = {name: load_recipe(recipe).train.steps for name, recipe in recipes.items()}
    if len(set(steps.values())) != 1:
        sys.exit(f"the recipes must share one budget, got {steps}")
    steps = steps[MODEL[0]]
    jobs = {(name, seed): (feats, work / f"{recipe.split('/')[-1]}-seed{seed}", recipe, seed, steps, device)
            for name, recipe in recipes.items() for seed in args.seeds}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(run_one, *job) for key, job in jobs.items()}
        results = {key: f.result() for key, f in futures.items()}

    print(f"\nvctk-mini test split, {steps} steps per run\n")
    print("| model | seed | mel-MSE (dB^2) | perplexity | used codes |\n|---|---|---|---|---|")
    for (name, seed), r in results.items():
        print(f"| {name} | {seed} | {r['mel_mse_db2']:.2f} | {r['perplexity']:.1f} | {r['used_codes']} |")
    means = {}
    for name in recipes:
        rows = [results[(name, s)] for s in args.seeds]
        means[name] = {m: statistics.fmean(r[m] for r in rows) for m in METRICS}
        spread = {m: statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0 for m in METRICS}
        print(f"| {name} | mean +- std | {means[name]['mel_mse_db2']:.2f} +- {spread['mel_mse_db2']:.2f} | "
              f"{means[name]['perplexity']:.1f} +- {spread['perplexity']:.1f} | {means[name]['used_codes']:.0f} |")
    sq = means[MODEL[0]]
    for name in list(recipes)[1:]:
        vq = means[name]
        print(f"\nvs {name}: SQ-VAE IV lower mel-MSE: {sq['mel_mse_db2'] < vq['mel_mse_db2']} "
              f"({sq['mel_mse_db2'] - vq['mel_mse_db2']:+.2f} dB^2); higher perplexity: "
              f"{sq['perplexity'] > vq['perplexity']} (x{sq['perplexity'] / vq['perplexity']:.2f})")


if __name__ == "__main__":
    main()
