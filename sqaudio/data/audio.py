"""Audio files -> validated mono waveforms at the feature sample rate (what every feature is computed from).

Reading (any soundfile format, a segment by offset and duration), down-mixing (the channels' mean), band-limited
resampling (librosa 0.7.2's `kaiser_best`) and the checks that turn unusable audio into an `AudioError`
(unreadable, empty, NaN, silent, unsupported rate, too short).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from sqaudio.config import FeatureConfig
from sqaudio.errors import UserError

SILENCE = 1e-4  # peak-to-peak below this (-80 dBFS) counts as silence: peak normalisation would blow up noise
MIN_RATE, MAX_RATE = 4000, 768_000  # sample rates accepted from audio files
# librosa 0.7.2's default resampler is resampy's pre-computed `kaiser_best` filter: Kaiser beta 12.9846, roll-off
# 0.917347, 50 input-rate samples per wing (resampy/filters.py). torchaudio counts the wing in zero crossings of the
# roll-off sinc, i.e. 50 * roll-off. Measured against resampy 0.4.3: max |difference| 5e-6 (8 -> 16 kHz) to 2e-3
# (48 -> 16 kHz, white noise at unit variance; resampy's own table stepping), see tests/data/test_features.py.
_ROLLOFF = 0.9173473712608761  # stored in resampy/data/kaiser_best.npz
KAISER_BEST = dict(lowpass_filter_width=50 * _ROLLOFF, rolloff=_ROLLOFF, resampling_method="sinc_interp_kaiser",
                   beta=12.9846)


class AudioError(UserError):
    """An audio file that cannot become a valid feature (unreadable, empty, silent, NaN, too short)."""


def min_samples(cfg: FeatureConfig) -> int:
    """Shortest waveform whose reflect-padded STFT is defined (more than n_fft // 2 samples)."""
    return cfg.n_fft // 2 + 1


def read_audio(path: str | Path, offset: float = 0.0, duration: float | None = None) -> tuple[np.ndarray, int]:
    """Read any soundfile-readable file as float32 mono (stereo is averaged). Raises AudioError.

    Args:
        offset, duration: seconds; the segment [offset, offset + duration) is read (librosa.load's rounding).
    """
    try:
        rate = sf.info(str(path)).samplerate if offset or duration is not None else None
        start = int(round(offset * rate)) if rate else 0
        stop = start + int(round(duration * rate)) if rate and duration is not None else None
        data, rate = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for corrupt/unknown files
        raise unreadable(err) from None
    if data.size == 0:
        raise AudioError("empty audio (no samples)" + (f" at offset {offset:g} s" if offset else ""))
    return down_mix(data), rate


def down_mix(data: np.ndarray) -> np.ndarray:
    """(samples, channels) float32 -> (samples,): the first channel, or the channels' mean."""
    return data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)


def unreadable(err: Exception) -> AudioError:
    """The AudioError for a file soundfile cannot read (the first line of its message)."""
    return AudioError(f"unreadable audio: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (librosa 0.7.2's kaiser_best equivalent)."""
    if orig_rate == new_rate:
        return wav
    divisor = math.gcd(int(orig_rate), int(new_rate))
    return AF.resample(wav, int(orig_rate) // divisor, int(new_rate) // divisor, **KAISER_BEST)


def load_audio(path: str | Path, cfg: FeatureConfig, offset: float = 0.0, duration: float | None = None) -> np.ndarray:
    """Read, down-mix, resample to cfg.sample_rate and validate. Returns float32 (samples,)."""
    wav, rate = read_audio(path, offset, duration)
    return prepare_waveform(wav, rate, cfg)


def prepare_waveform(wav: np.ndarray, rate: int, cfg: FeatureConfig) -> np.ndarray:
    """Validate a mono waveform and resample it to cfg.sample_rate. Raises AudioError."""
    check_finite(wav)
    check_rate(rate)
    if wav.size:
        check_range(float(wav.min()), float(wav.max()))
    out = resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), rate, cfg.sample_rate).numpy()
    check_resampled(out.shape[-1], bool(np.any(np.abs(out) > 0)), cfg)
    return out


def check_finite(wav: np.ndarray) -> None:
    """Refuse NaN or infinite samples."""
    if not np.all(np.isfinite(wav)):
        raise AudioError("audio contains NaN or infinite samples")


def check_rate(rate: int) -> None:
    """Refuse sample rates outside MIN_RATE..MAX_RATE."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"unsupported sample rate {rate} Hz (need {MIN_RATE}-{MAX_RATE} Hz)")


def check_range(low: float, high: float) -> None:
    """Refuse a signal whose lowest and highest samples are closer than SILENCE."""
    if high - low < SILENCE:
        raise AudioError("all-silent audio (constant or below -80 dBFS)")


def check_resampled(samples: int, nonzero: bool, cfg: FeatureConfig) -> None:
    """Refuse a resampled signal too short for one STFT frame, or all zeros."""
    if samples < min_samples(cfg):
        raise AudioError(f"too short: {samples / cfg.sample_rate:.3f} s, need at least "
                         f"{min_samples(cfg) / cfg.sample_rate:.3f} s")
    if not nonzero:
        raise AudioError("all-silent audio")

