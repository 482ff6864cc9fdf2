"""The one log-mel feature of sqaudio, used by prepare, train, evaluate and reconstruct alike.

Definition (sony/sqvae `preprocess.py` on librosa 0.7.2): 16 kHz mono, peak-normalise to 0.999,
pre-emphasis 0.97, |STFT| (n_fft 2048, Hann window 400, hop 160, centre reflect padding), 80 Slaney mel
bands from 50 Hz (area-normalised filters, power 1), `amplitude_to_db` (20 log10 max(S, 1e-5) with
ref 1.0, floored at max - top_db), then logmel / top_db + 1.

Speed (CPU): the Hann window is only win_length (400) samples long inside an n_fft (2048) frame, so only those
samples are framed and windowed, an rfft zero-pads them to n_fft, and |X| is taken on the real view; this is
about 2x faster than torch.stft(...).abs() and than a window-sized DFT matmul (frames x 400 @ 400 x 2050), which
was measured and dropped. On other devices torch.stft is used. Both paths agree with librosa to ~1e-6.

Waveforms come from `sqaudio.data.audio`; long files are streamed through the same steps by
`sqaudio.data.stream.MelStream`. `log_mel_spectrogram` is the definition the tests hold both to.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from sqaudio.config import FeatureConfig
from sqaudio.errors import UserError

AMIN = 1e-5  # librosa.amplitude_to_db floor on magnitudes
PAD_MODES = ("reflect", "constant")
STFT_METHODS = ("auto", "frames", "stft")
FRAME_CHUNK = 2048  # frames per rfft call on the CPU path (bounds memory for hour-long files)


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
        filters = AF.melscale_fbanks(cfg.n_fft // 2 + 1, cfg.fmin, fmax, cfg.n_mels, cfg.sample_rate,
                                     norm="slaney", mel_scale="slaney")  # (freqs, mels)
        self.register_buffer("fbank", filters.T.contiguous(), persistent=False)  # (mels, freqs)
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav = wav.to(self.fbank.dtype)
        wav = self.preemphasise(self.normalise(wav, wav.abs().amax(dim=-1, keepdim=True)))
        if self.method == "frames" or (self.method == "auto" and wav.device.type == "cpu"):
            mel = self.mel(self._frames(wav))
        else:
            spec = torch.stft(wav, self.cfg.n_fft, self.cfg.hop_length, self.cfg.win_length, self.window,
                              center=True, pad_mode=self.cfg.pad_mode, return_complex=True).abs()  # (B, freqs, T)
            mel = torch.matmul(self.fbank, spec)  # (B, mels, frames)
        db = self.db(mel)
        return self.floor(db, db.amax(dim=(-2, -1), keepdim=True))

    # The steps of `forward`, shared with the streaming `MelStream` (one definition of the feature).
    def normalise(self, wav: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Peak normalisation to cfg.peak, given the whole signal's peak |sample|."""
        return wav / peak * self.cfg.peak

    def preemphasise(self, wav: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """y[n] = x[n] - p x[n-1] along the last axis; `previous`: the sample before wav (None: wav starts the file)."""
        if previous is None:
            return torch.cat([wav[..., :1], wav[..., 1:] - self.cfg.preemphasis * wav[..., :-1]], dim=-1)
        wav = torch.cat([previous, wav], dim=-1)
        return wav[..., 1:] - self.cfg.preemphasis * wav[..., :-1]

    def mel(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, win) frames under the window -> (B, mels, T) amplitude mel, FRAME_CHUNK frames at a time."""
        return torch.cat([torch.matmul(self.fbank, self._magnitude(chunk).transpose(1, 2))  # (B, mels, chunk)
                          for chunk in frames.split(FRAME_CHUNK, dim=1)], dim=-1)

    @staticmethod
    def db(mel: torch.Tensor) -> torch.Tensor:
        """Amplitude mel -> dB (20 log10 max(S, AMIN))."""
        return 20.0 * torch.log10(mel.clamp(min=AMIN))

    def floor(self, db: torch.Tensor, max_db: torch.Tensor) -> torch.Tensor:
        """dB -> normalised log-mel, floored at the whole utterance's max_db - top_db."""
        return torch.maximum(db, max_db - self.cfg.top_db) / self.cfg.top_db + 1.0

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

    @property
    def window_offset(self) -> int:
        """Frame t's window covers samples [t hop - window_offset, t hop - window_offset + win_length)."""
        return self.cfg.n_fft // 2 - (self.cfg.n_fft - self.cfg.win_length) // 2

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
            wav = self.preemphasise(self.normalise(wav, wav.abs().amax()))
            rows.append(F.pad(wav[None, None], (pad, pad), mode=cfg.pad_mode)[0, 0])
        longest = max(len(r) for r in rows)
        padded = torch.stack([F.pad(r, (0, longest - len(r))) for r in rows])  # (B, longest)
        start = (cfg.n_fft - cfg.win_length) // 2
        frames = padded[:, start:].unfold(-1, cfg.win_length, cfg.hop_length)  # (B, T, win), a view
        mel = self.mel(frames)  # memory: chunks, not T
        out = []
        for row, wav in zip(mel, wavs):
            db = self.db(row[:, : len(wav) // cfg.hop_length + 1])
            out.append(self.floor(db, db.amax()))
        return out


def log_mel_spectrogram(wav: np.ndarray | torch.Tensor, cfg: FeatureConfig) -> np.ndarray:
    """One 16 kHz waveform (samples,) -> float32 normalised log-mel (n_mels, frames) on the CPU."""
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))[None]
    with torch.no_grad():
        return cached_log_mel(cfg)(x)[0].numpy()


_LOG_MELS: dict[str, LogMel] = {}


def cached_log_mel(cfg: FeatureConfig) -> LogMel:
    """The CPU LogMel of `cfg`, built once per process."""
    key = repr(cfg)
    if key not in _LOG_MELS:
        _LOG_MELS[key] = LogMel(cfg)
    return _LOG_MELS[key]


def logmel_to_db(logmel: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Undo the final normalisation: normalised log-mel -> dB."""
    return (logmel - 1.0) * cfg.top_db


def mel_mse_db2(sse: float, n_mels: int, frames: int, top_db: float) -> float:
    """Paper Table 3: sum of squared errors * top_db^2 / (n_mels * compared frames)."""
    return sse * top_db**2 / (n_mels * frames)
