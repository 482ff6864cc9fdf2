"""What a vocoder's input mel means (`MelConvention`: the analysis grid plus the log/normalisation convention)
and the conversion between conventions on the same grid: top_db and peak level exactly, log10 + z-scoring
exactly, pre-emphasis approximately (the filter's mean gain per mel band)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional as AF

from sqaudio.config import FeatureConfig


@dataclass(frozen=True)
class MelConvention:
    """What a vocoder's input mel means: the analysis grid plus the log/normalisation convention.

    Args:
        sample_rate, hop_length, n_fft, win_length, window, n_mels, fmin, fmax: the analysis grid.
        scale: "db_normalised" (ours: 20 log10(mel) / top_db + 1, floored at max - top_db) or "log10_zscore".
        preemphasis: the filter applied before the STFT (0 = none).
        top_db, peak: ours only. mean/scale: per-band z-scoring of log10 mel (log10_zscore only).
        layout: how the mel is laid out in the original tool (ours (mels, frames); parallel-wavegan (frames, mels)).
    The STFT padding mode is not part of it: it only changes the first and last frames.
    """

    sample_rate: int
    hop_length: int
    n_fft: int
    win_length: int
    window: str
    n_mels: int
    fmin: float
    fmax: float
    scale: str = "db_normalised"
    preemphasis: float = 0.0
    top_db: float = 80.0
    peak: float = 0.999
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: str = "(mels, frames)"

    GRID = ("sample_rate", "hop_length", "n_fft", "win_length", "window", "n_mels", "fmin", "fmax")

    @classmethod
    def of(cls, cfg: FeatureConfig) -> "MelConvention":
        return cls(cfg.sample_rate, cfg.hop_length, cfg.n_fft, cfg.win_length, "hann", cfg.n_mels,
                   float(cfg.fmin), float(cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2),
                   "db_normalised", cfg.preemphasis, cfg.top_db, cfg.peak)

    def describe(self) -> dict[str, str]:
        out = {k: f"{getattr(self, k):g}" if isinstance(getattr(self, k), float) else str(getattr(self, k))
               for k in self.GRID}
        out["log scale"] = (f"dB normalised (dB/{self.top_db:g} + 1)" if self.scale == "db_normalised"
                            else "log10, z-scored with stats")
        out["pre-emphasis"] = f"{self.preemphasis:g}" if self.preemphasis else "none"
        out["peak normalisation"] = f"{self.peak:g}" if self.scale == "db_normalised" else "none"
        out["layout"] = self.layout
        return out


def differences(have: MelConvention, want: MelConvention) -> tuple[list[str], list[str]]:
    """(blocking, convertible) lists of 'setting: features X, vocoder Y' between two conventions."""
    a, b = have.describe(), want.describe()
    diff = [k for k in a if a[k] != b[k]]
    line = "{}: features {} vs vocoder {}".format
    return ([line(k, a[k], b[k]) for k in diff if k in MelConvention.GRID],
            [line(k, a[k], b[k]) for k in diff if k not in MelConvention.GRID])


def mel_filterbank(conv: MelConvention) -> torch.Tensor:
    """The Slaney mel filterbank of a convention's grid, (n_mels, n_fft // 2 + 1)."""
    return AF.melscale_fbanks(conv.n_fft // 2 + 1, conv.fmin, conv.fmax, conv.n_mels, conv.sample_rate,
                              norm="slaney", mel_scale="slaney").T  # (mels, freqs)


def preemphasis_gain_db(conv: MelConvention, coef: float) -> torch.Tensor:
    """Per-band mean gain of the filter 1 - coef z^-1 in dB, (n_mels,): how it tilts a flat spectrum's mel."""
    fb = mel_filterbank(conv).double()
    w = torch.linspace(0, torch.pi, fb.size(1), dtype=torch.float64)
    gain = torch.sqrt((1 - coef * torch.cos(w)) ** 2 + (coef * torch.sin(w)) ** 2)
    return (20 * torch.log10((fb @ gain) / fb.sum(1).clamp(min=1e-12))).float()


def convert_logmel(x: torch.Tensor, src: MelConvention, dst: MelConvention) -> torch.Tensor:
    """Re-express a mel (B, n_mels, frames) given in `src` in `dst` (same grid). Identity when equal."""
    if src == dst:
        return x
    db = (x - 1.0) * src.top_db if src.scale == "db_normalised" else \
        20.0 * (x * _col(src.std, x) + _col(src.mean, x))  # 20 log10(mel)
    if src.preemphasis != dst.preemphasis:
        tilt = preemphasis_gain_db(dst, dst.preemphasis) - preemphasis_gain_db(src, src.preemphasis)
        db = db + tilt.to(db)[:, None]
    if dst.scale == "log10_zscore":
        return (db / 20.0 - _col(dst.mean, x)) / _col(dst.std, x)
    if src.scale == "db_normalised":
        db = db + 20.0 * np.log10(dst.peak / src.peak)
    db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - dst.top_db)
    return db / dst.top_db + 1.0


def _col(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]  # (n_mels, 1)
