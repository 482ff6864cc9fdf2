"""The one log-mel feature of sqaudio, used by prepare, train, evaluate and reconstruct alike.

Definition (sony/sqvae `preprocess.py` on librosa 0.7.2): 16 kHz mono, peak-normalise to 0.999,
pre-emphasis 0.97, |STFT| (n_fft 2048, Hann window 400, hop 160, centre reflect padding), 80 Slaney mel
bands from 50 Hz (area-normalised filters, power 1), `amplitude_to_db` (20 log10 max(S, 1e-5) with
ref 1.0, floored at max - top_db), then logmel / top_db + 1.
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

AMIN = 1e-5  # librosa.amplitude_to_db floor on magnitudes
# torchaudio's sinc/Kaiser resampler set to match librosa 0.7.2's default resampler (resampy kaiser_best).
KAISER_BEST = dict(lowpass_filter_width=64, rolloff=0.9475937167399596,
                   resampling_method="sinc_interp_kaiser", beta=14.769656459379492)


class AudioError(UserError):
    """An audio file that cannot become a valid feature (unreadable, empty, silent, NaN, too short)."""


def min_samples(cfg: FeatureConfig) -> int:
    """Shortest waveform whose reflect-padded STFT is defined (more than n_fft // 2 samples)."""
    return cfg.n_fft // 2 + 1


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read any soundfile-readable file as float32 mono (stereo is averaged). Raises AudioError."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for corrupt/unknown files
        raise AudioError(f"unreadable audio: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if data.size == 0:
        raise AudioError("empty audio (no samples)")
    return data.mean(axis=1), rate


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (librosa 0.7.2's kaiser_best equivalent)."""
    if orig_rate == new_rate:
        return wav
    g = math.gcd(int(orig_rate), int(new_rate))
    return AF.resample(wav, int(orig_rate) // g, int(new_rate) // g, **KAISER_BEST)


def load_audio(path: str | Path, cfg: FeatureConfig) -> np.ndarray:
    """Read, down-mix, resample to cfg.sample_rate and validate. Returns float32 (samples,)."""
    wav, rate = read_audio(path)
    return prepare_waveform(wav, rate, cfg)


def prepare_waveform(wav: np.ndarray, rate: int, cfg: FeatureConfig) -> np.ndarray:
    """Validate a mono waveform and resample it to cfg.sample_rate. Raises AudioError."""
    if not np.all(np.isfinite(wav)):
        raise AudioError("audio contains NaN or infinite samples")
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    out = resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), rate, cfg.sample_rate).numpy()
    if out.shape[-1] < min_samples(cfg):
        raise AudioError(f"too short: {out.shape[-1] / cfg.sample_rate:.3f} s, need at least "
                         f"{min_samples(cfg) / cfg.sample_rate:.3f} s")
    if not np.any(np.abs(out) > 0):
        raise AudioError("all-silent audio")
    return out


class LogMel(torch.nn.Module):
    """Batched log-mel on any device: (B, samples) -> (B, n_mels, frames), frames = samples // hop + 1.

    Args:
        cfg: the feature definition; every row of a batch must hold a whole (unpadded) utterance.
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        fmax = cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2
        fb = AF.melscale_fbanks(cfg.n_fft // 2 + 1, cfg.fmin, fmax, cfg.n_mels, cfg.sample_rate,
                                norm="slaney", mel_scale="slaney")  # (freqs, mels)
        self.register_buffer("fbank", fb.T.contiguous(), persistent=False)  # (mels, freqs)
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        wav = wav.to(self.fbank.dtype)
        peak = wav.abs().amax(dim=-1, keepdim=True)
        wav = wav / peak * cfg.peak
        wav = torch.cat([wav[..., :1], wav[..., 1:] - cfg.preemphasis * wav[..., :-1]], dim=-1)
        spec = torch.stft(wav, cfg.n_fft, cfg.hop_length, cfg.win_length, self.window, center=True,
                          pad_mode=cfg.pad_mode, return_complex=True).abs()  # (B, freqs, frames)
        mel = torch.matmul(self.fbank, spec)  # (B, mels, frames)
        db = 20.0 * torch.log10(mel.clamp(min=AMIN))
        db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - cfg.top_db)
        return db / cfg.top_db + 1.0


def log_mel_spectrogram(wav: np.ndarray | torch.Tensor, cfg: FeatureConfig) -> np.ndarray:
    """One 16 kHz waveform (samples,) -> float32 normalised log-mel (n_mels, frames) on the CPU."""
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))[None]
    with torch.no_grad():
        return _cached_logmel(cfg)(x)[0].numpy()


_LOGMELS: dict[str, LogMel] = {}


def _cached_logmel(cfg: FeatureConfig) -> LogMel:
    key = repr(cfg)
    if key not in _LOGMELS:
        _LOGMELS[key] = LogMel(cfg)
    return _LOGMELS[key]


def logmel_to_db(logmel: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Undo the final normalisation: normalised log-mel -> dB."""
    return (logmel - 1.0) * cfg.top_db
