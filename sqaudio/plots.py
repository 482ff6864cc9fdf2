"""Figures a researcher looks at: mel spectrograms side by side."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def plot_mels(original: np.ndarray, reconstructed: np.ndarray, path: str | Path, title: str = "") -> Path:
    """PNG with the input log-mel above the reconstruction (both (n_mels, frames), normalised units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for ax, mel, name in zip(axes, (original[:, 1:-1], reconstructed), ("input", "reconstruction")):
        ax.imshow(mel, origin="lower", aspect="auto", vmin=0, vmax=max(1.0, float(original.max())))
        ax.set_title(f"{title} {name}".strip())
        ax.set_ylabel("mel band")
    axes[-1].set_xlabel("frame (10 ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_annealing(out: Path) -> Path | None:
    """PNG of the self-annealing curves (entropy of P_hat, sigma_phi^2, perplexity vs step)."""
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()] if (out / "history.jsonl").exists() else []
    keys = [k for k in ("entropy", "var_q", "var_q_harmonic", "perplexity", "mel_mse_db2") if rows and k in rows[-1]]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_xlabel("step")
        ax.set_title(key)
        if key.startswith("var_q"):
            ax.set_yscale("log")
    fig.tight_layout()
    path = out / "annealing.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
