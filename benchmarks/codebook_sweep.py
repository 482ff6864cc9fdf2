"""The paper's Figure 5 on a CPU budget: SQ-VAE (I) vs VQ-VAE-EMA over codebook sizes K on MNIST / Fashion-MNIST.

For every dataset found under --data, every K (d_b = 64) and both models (`<dataset>/sqvae_gauss1` and the
textbook `<dataset>/vqvae_ema`, decay 0.99) it trains one run with the same step budget, constant learning
rate and seed, evaluates it on the test set (deterministic quantization) and writes:
  <json>                          {dataset: {model: {K: {mse, perplexity, used_codes}}}} plus the settings
  <plots>/codebook_sweep_perplexity.png, <plots>/codebook_sweep_mse.png   log-log, with the bound perplexity = K
Finished runs are reused (their eval-test.json), so an interrupted sweep continues. One CPU thread by default.

    .venv/bin/python benchmarks/codebook_sweep.py --data ~/data [--steps 800] [--ks 16 32 64 128 256 512]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sqaudio.config import load_recipe
from sqaudio.data.images import missing_files
from sqaudio.evaluation.metrics import evaluate
from sqaudio.evaluation.runs import load_run

DATASETS = ("mnist", "fashion_mnist")
MODELS = {"SQ-VAE I": "sqvae_gauss1", "VQ-VAE-EMA": "vqvae_ema"}
METRICS = ("mse", "perplexity", "used_codes")


def run_one(dataset: str, recipe: str, k: int, args, work: Path) -> dict:
    """Train (unless done) and evaluate one (dataset, model, K) run; returns its test metrics."""
    from sqaudio.training.sqvae import train

    run = work / dataset / f"{recipe}-K{k}"
    result = run / "eval-test.json"
    if result.is_file() and json.loads(result.read_text()).get("step") == args.steps:
        return json.loads(result.read_text())
    overrides = [f"quantizer.codebook_size={k}", "train.epochs=0", f"train.steps={args.steps}",
                 "train.lr_schedule=constant", f"train.checkpoint_every={args.steps}", "data.num_workers=0",
                 f"train.seed={args.seed}"]
    start = time.time()
    train(load_recipe(f"{dataset}/{recipe}", overrides), args.data, run, resume=run.is_dir(), device="cpu",
          quiet=True)
    metrics = evaluate(load_run(run, "cpu"), args.data, quiet=True)
    metrics["seconds"] = round(time.time() - start, 1)
    result.write_text(json.dumps(metrics, indent=1))
    return metrics


def plot(table: dict, ks: list[int], metric: str, path: Path) -> None:
    """One log-log panel per dataset in the project's figure style (`sqaudio.plots`)."""
    from sqaudio.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(table), figsize=(5.0 * len(table), 4.0), squeeze=False)
    for ax, (dataset, rows) in zip(axes[0], table.items()):
        for (name, by_k), marker in zip(rows.items(), "os"):
            ax.plot(ks, [by_k[str(k)][metric] for k in ks], marker=marker, label=name)
        if metric == "perplexity":
            ax.plot(ks, ks, "k--", lw=0.8, label="upper bound K")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size K")
        ax.set_title(dataset.replace("_", "-"))
        ax.grid(True, which="both", lw=0.3)
    axes[0][0].set_ylabel({"mse": "test MSE (per pixel)", "perplexity": "test perplexity (codes)"}[metric])
    axes[0][0].legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="torchvision root with MNIST/raw and/or FashionMNIST/raw")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=800, help="training steps per run (batch 32)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/codebook_sweep")
    parser.add_argument("--json", default="docs/codebook_sweep.json")
    parser.add_argument("--plots", default="docs", help="folder for the two PNGs")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNGs from --json, train nothing")
    args = parser.parse_args()
    if args.plot_only:
        table = json.loads(Path(args.json).read_text())["results"]
        for metric in ("perplexity", "mse"):
            plot(table, args.ks, metric, Path(args.plots) / f"codebook_sweep_{metric}.png")
        return
    torch.set_num_threads(args.threads)

    datasets = []
    for dataset in args.datasets:
        missing = missing_files(dataset, args.data)
        if missing:
            print(f"skipping {dataset}: missing {', '.join(missing)} under {args.data}")
        else:
            datasets.append(dataset)
    if not datasets:
        raise SystemExit("no dataset found; see docs/images.md for the layouts")
    table = {d: {name: {} for name in MODELS} for d in datasets}
    for dataset in datasets:
        for k in args.ks:
            for name, recipe in MODELS.items():
                m = run_one(dataset, recipe, k, args, Path(args.work))
                table[dataset][name][str(k)] = {key: m[key] for key in METRICS}
                print(f"{dataset} K={k:4d} {name:10s} mse={m['mse']:.5f} perplexity={m['perplexity']:7.1f} "
                      f"used={m['used_codes']}", flush=True)
    settings = {"steps": args.steps, "batch_size": 32, "dim": 64, "seed": args.seed, "lr": "1e-3 constant",
                "recipes": {name: f"<dataset>/{r}" for name, r in MODELS.items()}, "threads": args.threads}
    Path(args.json).write_text(json.dumps({"settings": settings, "results": table}, indent=1))
    for metric in ("perplexity", "mse"):
        plot(table, args.ks, metric, Path(args.plots) / f"codebook_sweep_{metric}.png")
    print(f"\n| dataset | K | {' | '.join(f'{n} perplexity / MSE' for n in MODELS)} | SQ perplexity higher |")
    print("|---|---|---|---|---|")
    for dataset in datasets:
        for k in args.ks:
            cells = [table[dataset][n][str(k)] for n in MODELS]
            higher = cells[0]["perplexity"] > cells[1]["perplexity"]
            print(f"| {dataset} | {k} | " + " | ".join(f"{c['perplexity']:.1f} / {c['mse']:.5f}" for c in cells)
                  + f" | {'yes' if higher else 'no'} |")


if __name__ == "__main__":
    main()
