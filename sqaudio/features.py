"""The one log-mel feature of sqaudio, used by prepare, train, evaluate and reconstruct alike.

Definition (sony/sqvae `preprocess.py` on librosa 0.7.2): 16 kHz mono, peak-normalise to 0.999,
pre-emphasis 0.97, |STFT| (n_fft 2048, Hann window 400, hop 160, centre reflect padding), 80 Slaney mel
bands from 50 Hz (area-normalised filters, power 1), `amplitude_to_db` (20 log10 max(S, 1e-5) with
ref 1.0, floored at max - top_db), then logmel / top_db + 1.

Speed (CPU): the Hann window is only win_length (400) samples long inside an n_fft (2048) frame, so only those
samples are framed and windowed, an rfft zero-pads them to n_fft, and |X| is taken on the real view; this is
about 2x faster than torch.stft(...).abs() and than a window-sized DFT matmul (frames x 400 @ 400 x 2050), which
was measured and dropped. On other devices torch.stft is used. Both paths agree with librosa to ~1e-6.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from sqaudio.config import FeatureConfig
from sqaudio.errors import UserError

AMIN = 1e-5  # librosa.amplitude_to_db floor on magnitudes
SILENCE = 1e-4  # peak-to-peak below this (-80 dBFS) counts as silence: peak normalisation would blow up noise
MIN_RATE, MAX_RATE = 4000, 768_000  # sample rates accepted from audio files
PAD_MODES = ("reflect", "constant")
STFT_METHODS = ("auto", "frames", "stft")
FRAME_CHUNK = 2048  # frames per rfft call on the CPU path (bounds memory for hour-long files)
# librosa 0.7.2's default resampler is resampy's pre-computed `kaiser_best` filter: Kaiser beta 12.9846, roll-off
# 0.917347, 50 input-rate samples per wing (resampy/filters.py). torchaudio counts the wing in zero crossings of the
# roll-off sinc, i.e. 50 * roll-off. Measured against resampy 0.4.3: max |difference| 5e-6 (8 -> 16 kHz) to 2e-3
# (48 -> 16 kHz, white noise at unit variance; resampy's own table stepping), see tests/test_features.py.
_ROLLOFF = 0.9173473712608761  # stored in resampy/data/kaiser_best.npz
KAISER_BEST = dict(lowpass_filter_width=50 * _ROLLOFF, rolloff=_ROLLOFF, resampling_method="sinc_interp_kaiser",
                   beta=12.9846)


class AudioError(UserError):
    """An audio file that cannot become a valid feature (unreadable, empty, silent, NaN, too short)."""


def min_samples(cfg: FeatureConfig) -> int:
    """Shortest waveform whose reflect-padded STFT is defined (more than n_fft // 2 samples)."""
    return cfg.n_fft // 2 + 1


def check_config(cfg: FeatureConfig) -> FeatureConfig:
    """Raise UserError naming the first impossible FeatureConfig field; return cfg unchanged."""
    problems = [(cfg.sample_rate <= 0, "sample_rate must be > 0"),
                (cfg.n_fft < 2, "n_fft must be >= 2"),
                (not 0 < cfg.win_length <= cfg.n_fft, "win_length must be in 1..n_fft"),
                (cfg.hop_length <= 0, "hop_length must be > 0"),
                (cfg.n_mels <= 0, "n_mels must be > 0"),
                (not 0 < cfg.peak <= 1, "peak must be in (0, 1]"),
                (not 0 <= cfg.preemphasis < 1, "preemphasis must be in [0, 1)"),
                (cfg.top_db <= 0, "top_db must be > 0"),
                (cfg.fmin < 0 or cfg.fmin >= (cfg.fmax or cfg.sample_rate / 2), "need 0 <= fmin < fmax"),
                (cfg.fmax is not None and cfg.fmax > cfg.sample_rate / 2, "fmax must be <= sample_rate / 2"),
                (cfg.pad_mode not in PAD_MODES, f"pad_mode must be one of {', '.join(PAD_MODES)}")]
    for bad, message in problems:
        if bad:
            raise UserError(f"invalid feature config: {message} (got {cfg})")
    return cfg


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
        raise AudioError(f"unreadable audio: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if data.size == 0:
        raise AudioError("empty audio (no samples)" + (f" at offset {offset:g} s" if offset else ""))
    return (data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)), rate


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (librosa 0.7.2's kaiser_best equivalent)."""
    if orig_rate == new_rate:
        return wav
    g = math.gcd(int(orig_rate), int(new_rate))
    return AF.resample(wav, int(orig_rate) // g, int(new_rate) // g, **KAISER_BEST)


def load_audio(path: str | Path, cfg: FeatureConfig, offset: float = 0.0, duration: float | None = None) -> np.ndarray:
    """Read, down-mix, resample to cfg.sample_rate and validate. Returns float32 (samples,)."""
    wav, rate = read_audio(path, offset, duration)
    return prepare_waveform(wav, rate, cfg)


def prepare_waveform(wav: np.ndarray, rate: int, cfg: FeatureConfig) -> np.ndarray:
    """Validate a mono waveform and resample it to cfg.sample_rate. Raises AudioError."""
    if not np.all(np.isfinite(wav)):
        raise AudioError("audio contains NaN or infinite samples")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"unsupported sample rate {rate} Hz (need {MIN_RATE}-{MAX_RATE} Hz)")
    if wav.size and float(wav.max()) - float(wav.min()) < SILENCE:
        raise AudioError("all-silent audio (constant or below -80 dBFS)")
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
        method: how |STFT| is computed: "frames" (win_length-sized frames, rfft zero-padded to n_fft, a
            real-view magnitude), "stft" (torch.stft), or "auto" (frames on the CPU, stft elsewhere).
            Both give the same values up to float32 rounding.
    """

    def __init__(self, cfg: FeatureConfig, method: str = "auto"):
        super().__init__()
        if method not in STFT_METHODS:
            raise ValueError(f"method must be one of {STFT_METHODS}, got {method!r}")
        self.cfg, self.method = check_config(cfg), method
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
        if self.method == "frames" or (self.method == "auto" and wav.device.type == "cpu"):
            frames = self._frames(wav)  # (B, T, win), a view
            mel = torch.cat([torch.matmul(self.fbank, self._magnitude(chunk).transpose(1, 2))  # (B, mels, chunk)
                             for chunk in frames.split(FRAME_CHUNK, dim=1)], dim=-1)
        else:
            spec = torch.stft(wav, cfg.n_fft, cfg.hop_length, cfg.win_length, self.window, center=True,
                              pad_mode=cfg.pad_mode, return_complex=True).abs()  # (B, freqs, frames)
            mel = torch.matmul(self.fbank, spec)  # (B, mels, frames)
        db = 20.0 * torch.log10(mel.clamp(min=AMIN))
        db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - cfg.top_db)
        return db / cfg.top_db + 1.0

    def _frames(self, wav: torch.Tensor) -> torch.Tensor:
        """The win_length samples under the window of every torch.stft(center=True) frame: (B, samples) -> (B, T, win).

        The window covers only win_length of a frame's n_fft samples, so only those are cut out; rfft then zero-pads
        them to n_fft (their place inside the frame changes the phase of X, not |X|).
        """
        cfg = self.cfg
        start = (cfg.n_fft - cfg.win_length) // 2  # where torch.stft/librosa place the window in a frame
        pad = cfg.n_fft // 2
        padded = F.pad(wav[:, None], (pad, pad), mode=cfg.pad_mode)[:, 0]  # (B, samples + 2 pad)
        return padded[:, start:].unfold(-1, cfg.win_length, cfg.hop_length)[:, : wav.shape[-1] // cfg.hop_length + 1]

    def _magnitude(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, win) frames -> (B, T, freqs) |rfft| (taken on the real view: complex abs is slow on the CPU)."""
        spec = torch.view_as_real(torch.fft.rfft(frames * self.window, n=self.cfg.n_fft))  # (B, T, freqs, 2)
        spec.mul_(spec)
        return torch.add(spec[..., 0], spec[..., 1]).sqrt_()


    @torch.no_grad()
    def batch(self, wavs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Utterances of different lengths in one batch (e.g. on a GPU), exactly as one by one.

        Each row is normalised, pre-emphasised and reflect-padded on its own before the rows are stacked, and
        the top_db floor uses each row's own maximum, so padding changes nothing. Returns (n_mels, frames_i).
        """
        cfg, pad = self.cfg, self.cfg.n_fft // 2
        rows = []
        for wav in wavs:
            wav = wav.to(self.fbank)
            wav = wav / wav.abs().amax() * cfg.peak
            wav = torch.cat([wav[:1], wav[1:] - cfg.preemphasis * wav[:-1]])
            rows.append(F.pad(wav[None, None], (pad, pad), mode=cfg.pad_mode)[0, 0])
        longest = max(len(r) for r in rows)
        padded = torch.stack([F.pad(r, (0, longest - len(r))) for r in rows])  # (B, longest)
        start = (cfg.n_fft - cfg.win_length) // 2
        frames = padded[:, start:].unfold(-1, cfg.win_length, cfg.hop_length)  # (B, T, win), a view
        mel = torch.cat([torch.matmul(self.fbank, self._magnitude(chunk).transpose(1, 2))  # (B, mels, chunk)
                         for chunk in frames.split(FRAME_CHUNK, dim=1)], dim=-1)  # memory: chunks, not T
        out = []
        for row, wav in zip(mel, wavs):
            db = 20.0 * torch.log10(row[:, : len(wav) // cfg.hop_length + 1].clamp(min=AMIN))
            out.append(torch.maximum(db, db.amax() - cfg.top_db) / cfg.top_db + 1.0)
        return out


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
