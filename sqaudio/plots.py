"""Figures a researcher looks at: mel spectrograms side by side."""
from __future__ import annotations

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
