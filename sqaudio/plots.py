"""Every figure sqaudio writes, in one style: titles in words, axes with units, the run's name, readable size.

- `plot_annealing`: the self-annealing curves of a run (history.jsonl) -> annealing.png
- `compare_plot`: one bar chart per metric over runs, values on the bars, which way is better, step counts
- `plot_mels`: input above reconstructed log-mel, in dB with a colour bar
- `save_grid`: image originals above reconstructions, with row labels
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DPI = 150
# key: (title, unit for the axis, which way is better or None, log axis)
METRICS: dict[str, tuple[str, str, str | None, bool]] = {
    "mel_mse_db2": ("mel-MSE", "dB²", "lower", True),
    "mse_x1e3": ("image MSE ×10³", "per pixel, ×10³", "lower", False),
    "accuracy": ("pixel accuracy", "fraction", "higher", False),
    "miou": ("mean IoU", "fraction", "higher", False),
    "perplexity": ("code perplexity", "codes", "higher", False),
    "used_codes": ("codes used", "codes", "higher", False),
    "entropy": ("entropy of P̂ (code posterior)", "nats", None, False),
    "var_q": ("σ²_φ (mean)", "σ²", None, True),
    "var_q_harmonic": ("σ²_φ (1 / mean precision)", "σ²", None, True),
}
ANNEALING_KEYS = ("entropy", "var_q", "var_q_harmonic", "perplexity", "mel_mse_db2")
COMPARE_KEYS = ("mel_mse_db2", "mse_x1e3", "accuracy", "miou", "perplexity", "used_codes")


def pyplot():
    """matplotlib.pyplot (headless) with the shared style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3,
                         "figure.titlesize": 13})
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure atomically (never a half-written PNG) and close it."""
    from sqaudio.files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or "png",
                                               bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def axis_label(key: str) -> str:
    title, unit, _, _ = METRICS.get(key, (key, "", None, False))
    return f"{title} ({unit})" if unit else title


def plot_annealing(out: Path, run_name: str | None = None) -> Path | None:
    """annealing.png in run dir `out` (None when history.jsonl holds nothing to plot); returns its path."""
    history = Path(out) / "history.jsonl"
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()] if history.exists() else []
    fig = annealing_figure(rows, run_name or Path(out).resolve().name)
    return save_figure(fig, Path(out) / "annealing.png") if fig is not None else None


def annealing_figure(rows: list[dict[str, Any]], run_name: str):
    """Entropy of P̂, σ²_φ, perplexity and mel-MSE over training steps, three panels per row."""
    keys = [k for k in ANNEALING_KEYS if any(k in r for r in rows)]
    if not keys:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        steps, values = zip(*points) if points else ((), ())
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=4)
        title, unit, _, log = METRICS[key]
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
        if log and values and min(values) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    last = max((r["step"] for r in rows), default=0)
    logged = f"{len(rows)} logged point{'s' * (len(rows) != 1)}"
    fig.suptitle(f"{run_name}: self-annealing over {last:,} steps ({logged})")
    fig.tight_layout()
    return fig


def compare_plot(rows: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of the runs' metrics at `path`; returns it."""
    return save_figure(compare_figure(rows), path)


def compare_figure(rows: dict[str, dict[str, Any]]):
    """One panel per metric, one bar per run (tick: run name and its step count), values on the bars."""
    keys = [k for k in COMPARE_KEYS if any(k in r for r in rows.values())]
    plt = pyplot()
    width = max(4.0, 1.1 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), 4.6), squeeze=False)
    ticks = [f"{name}\n{_steps(r)}" for name, r in rows.items()]
    for ax, key in zip(axes[0], keys):
        values = [float(r[key]) if r.get(key) is not None else np.nan for r in rows.values()]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[_short(v) for v in values], padding=2)
        ax.set_xticks(range(len(rows)), ticks, rotation=20 if len(rows) > 3 else 0, ha="center")
        title, _, better, _ = METRICS[key]
        ax.set_title(f"{title}\n({better} is better)" if better else title)
        ax.set_ylabel(axis_label(key))
        ax.margins(y=0.15)
    steps = {r.get("step") for r in rows.values()}
    note = "  —  runs trained for different step counts" if len(steps) > 1 else ""
    fig.suptitle(f"comparison of {len(rows)} runs{note}", color="C3" if note else "black")
    fig.tight_layout()
    return fig


def _steps(row: dict[str, Any]) -> str:
    return f"{row['step']:,} steps" if row.get("step") is not None else "steps unknown"


def _short(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.4g}"


def plot_mels(original: np.ndarray, reconstructed: np.ndarray, path: str | Path, title: str = "",
              top_db: float = 80.0, frame_rate: float = 100.0) -> Path:
    """PNG of `mels_figure` at `path`; returns it."""
    return save_figure(mels_figure(original, reconstructed, title, top_db, frame_rate), path)


def mels_figure(original: np.ndarray, reconstructed: np.ndarray, title: str = "", top_db: float = 80.0,
                frame_rate: float = 100.0):
    """Input log-mel above the reconstruction (both normalised (n_mels, frames)), in dB re peak, colour bar."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True, squeeze=True)
    pairs = ((original[:, 1:-1], "input"), (reconstructed, "reconstruction"))
    image = None
    for ax, (mel, name) in zip(axes, pairs):
        db = (np.asarray(mel, dtype=np.float32) - 1.0) * top_db
        image = ax.imshow(db, origin="lower", aspect="auto", vmin=-top_db, vmax=0, cmap="magma",
                          extent=(0, db.shape[1] / frame_rate, 0, db.shape[0]), interpolation="nearest")
        ax.set_title(f"{title} — {name}" if title else name)
        ax.set_ylabel("mel band")
        ax.grid(False)
    axes[-1].set_xlabel("time (s)")
    fig.colorbar(image, ax=list(axes), label="level (dB re peak)", fraction=0.04, pad=0.02)
    return fig


def save_grid(originals, recons, path: str | Path, title: str = "") -> Path:
    """PNG of `grid_figure` at `path`; returns it."""
    return save_figure(grid_figure(originals, recons, title), path)


def grid_figure(originals, recons, title: str = ""):
    """Images (N, C, H, W) in [0, 1] (or class maps (N, H, W) and logits) as two labelled rows, each image
    drawn 1.3 inches wide."""
    import torch

    if originals.dtype == torch.long:  # class maps: show class indices with a qualitative colour map
        rows, cmap = [originals.float(), recons.argmax(1).float()], "tab20"
    else:
        rows, cmap = [originals.float(), recons.float().clamp(0, 1)], "gray"
    n = len(originals)
    plt = pyplot()
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n + 1.2, 3.1), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, ("original", "reconstruction"))):
        for i in range(n):
            ax = axes[r][i]
            img = images[i].cpu().numpy()
            if img.ndim == 3:
                img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            ax.imshow(img, cmap=cmap, vmin=0, vmax=max(float(images.max()), 1.0) if cmap == "tab20" else 1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        axes[r][0].set_ylabel(label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_code_usage(counts: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Codebook usage: share of latent positions per code, codes sorted from most to least used, against the
    uniform share 1/K (a flat curve up to K means every code is used evenly)."""
    counts = np.asarray(counts, dtype=np.float64)
    share = np.sort(counts)[::-1] / max(counts.sum(), 1.0)
    used = int((counts > 0).sum())
    p = share[share > 0]
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ranks = np.arange(1, len(share) + 1)
    ax.fill_between(ranks, share, step="mid", color="C0", alpha=0.85, label="share of each code")
    ax.axhline(1 / len(share), color="C3", linestyle="--", linewidth=1, label=f"uniform share 1/{len(share)}")
    ax.set_xscale("log")  # ranks span 1..K: a log axis keeps the few most used codes readable
    ax.set_xlim(0.8, len(share) * 1.2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.StrMethodFormatter("{x:g}"))
    ax.set_xlabel("code rank (most used first, log scale)")
    ax.set_ylabel("share of latent positions")
    ax.legend(loc="upper right")
    summary = f"{used} of {len(counts)} codes used, perplexity {perplexity:.1f}"
    ax.set_title(f"{title}\n{summary}" if title else summary)
    fig.tight_layout()
    return save_figure(fig, path)
