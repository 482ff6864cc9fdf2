"""The one log-mel feature of sqaudio, used by prepare, train, evaluate and reconstruct alike.

Definition (sony/sqvae `preprocess.py` on librosa 0.7.2): 16 kHz mono, peak-normalise to 0.999,
pre-emphasis 0.97, |STFT| (n_fft 2048, Hann window 400, hop 160, centre reflect padding), 80 Slaney mel
bands from 50 Hz (area-normalised filters, power 1), `amplitude_to_db` (20 log10 max(S, 1e-5) with
ref 1.0, floored at max - top_db), then logmel / top_db + 1.

Speed (CPU): the Hann window is only win_length (400) samples long inside an n_fft (2048) frame, so only those
samples are framed and windowed, an rfft zero-pads them to n_fft, and |X| is taken on the real view; this is
about 2x faster than torch.stft(...).abs() and than a window-sized DFT matmul (frames x 400 @ 400 x 2050), which
was measured and dropped. On other devices torch.stft is used. Both paths agree with librosa to ~1e-6.

Long files (`reconstruct`, `encode`): `MelStream` computes the same feature in flat memory, in two passes over the
file (pass 1: peak of the resampled signal and the largest mel value; pass 2: the log-mel in chunks), with the
steps of `LogMel` applied to blocks (`normalise`, `preemphasise`, `mel`, `db`, `floor`) and `resample_blocks`
resampling block by block with the filter's context. `log_mel_spectrogram` stays the definition; the tests hold
the streamed feature to it (1e-6).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterable, Iterator

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
        raise _unreadable(err) from None
    if data.size == 0:
        raise AudioError("empty audio (no samples)" + (f" at offset {offset:g} s" if offset else ""))
    return _mono(data), rate


def _mono(data: np.ndarray) -> np.ndarray:
    """(samples, channels) float32 -> (samples,): the first channel, or the channels' mean."""
    return data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)


def _unreadable(err: Exception) -> AudioError:
    return AudioError(f"unreadable audio: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


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
    _check_finite(wav)
    _check_rate(rate)
    if wav.size:
        _check_range(float(wav.min()), float(wav.max()))
    out = resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), rate, cfg.sample_rate).numpy()
    _check_resampled(out.shape[-1], bool(np.any(np.abs(out) > 0)), cfg)
    return out


def _check_finite(wav: np.ndarray) -> None:
    if not np.all(np.isfinite(wav)):
        raise AudioError("audio contains NaN or infinite samples")


def _check_rate(rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"unsupported sample rate {rate} Hz (need {MIN_RATE}-{MAX_RATE} Hz)")


def _check_range(low: float, high: float) -> None:
    if high - low < SILENCE:
        raise AudioError("all-silent audio (constant or below -80 dBFS)")


def _check_resampled(samples: int, nonzero: bool, cfg: FeatureConfig) -> None:
    if samples < min_samples(cfg):
        raise AudioError(f"too short: {samples / cfg.sample_rate:.3f} s, need at least "
                         f"{min_samples(cfg) / cfg.sample_rate:.3f} s")
    if not nonzero:
        raise AudioError("all-silent audio")


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


# ------------------------------------------------------------------ streaming: the same feature in flat memory

READ_BLOCK = 1 << 16     # input frames per file read in the streaming path
RESAMPLE_CALL = 1 << 16  # input samples per resample call at least: torch picks its conv1d algorithm by size, and
                         # calls this long use the whole-signal call's (bit-identical output, measured 8-48 kHz)
MEL_BLOCK = 1000         # log-mel frames per streamed chunk (10 s at 16 kHz / hop 160)


def read_blocks(path: str | Path, block: int = READ_BLOCK) -> tuple[int, Iterator[np.ndarray]]:
    """(sample rate, iterator of float32 mono blocks) of a file, read `block` frames at a time (as `read_audio`,
    down-mixed the same way). Raises AudioError when the file cannot be opened or read, or holds no samples."""
    try:
        rate = sf.info(str(path)).samplerate
    except Exception as err:
        raise _unreadable(err) from None

    def blocks() -> Iterator[np.ndarray]:
        seen = 0
        try:
            with sf.SoundFile(str(path)) as f:
                while True:
                    data = f.read(block, dtype="float32", always_2d=True)
                    if not len(data):
                        break
                    seen += len(data)
                    yield _mono(data)
        except AudioError:
            raise
        except Exception as err:
            raise _unreadable(err) from None
        if not seen:
            raise AudioError("empty audio (no samples)")

    return rate, blocks()


def resample_blocks(blocks: Iterable[np.ndarray], orig_rate: int, new_rate: int) -> Iterator[torch.Tensor]:
    """`resample` of the concatenated blocks, yielded piece by piece in bounded memory.

    The kaiser sinc resampler (torchaudio's polyphase conv1d with stride orig) makes output unit k (new samples)
    from input [k orig - width, (k + 1) orig + width), zero outside the signal. Each piece is `resample` of an
    input slice that starts on a unit boundary with at least `width` samples of real context on both sides (or
    the file's own end), so every output sample sees exactly the inputs (and zero padding) it sees in the
    whole-signal call. Calls are at least RESAMPLE_CALL samples long, which keeps torch's conv1d on the same
    algorithm as the whole-signal call: the pieces join to the one-pass result exactly in the tests (bit for bit),
    and at worst up to float rounding of the convolution (~1e-7) should a build pick another algorithm."""
    if orig_rate == new_rate:
        for block in blocks:
            yield torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        return
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    width = math.ceil(KAISER_BEST["lowpass_filter_width"] * orig / (min(orig, new) * KAISER_BEST["rolloff"]))
    context = -(-width // orig) + 1  # units of context per side
    buf, start, done = np.zeros(0, np.float32), 0, 0  # buf holds input [start, start + len(buf)); units < done out
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            buf = np.concatenate([buf, np.asarray(block, dtype=np.float32)])
            ready = (start + len(buf) - width) // orig  # units whose input lies in what was read
            s0 = max(0, (done - context) * orig)
            if ready - done < 1 or ready * orig + width - s0 < RESAMPLE_CALL:
                continue
            stop = ready * orig + width
        else:  # the end: one call of at least RESAMPLE_CALL samples (or the whole file), as the whole-signal call
            ready, stop = None, start + len(buf)
            s0 = max(0, min((done - context) * orig, (stop - RESAMPLE_CALL) // orig * orig))
        out = resample(torch.from_numpy(buf[s0 - start:stop - start]), orig_rate, new_rate)
        first = (done - s0 // orig) * new
        yield out[first:] if ready is None else out[first:first + (ready - done) * new]
        if ready is not None:
            done = ready
            total = start + len(buf)
            keep = max(start, min((done - context) * orig, (total - RESAMPLE_CALL) // orig * orig))
            buf, start = buf[keep - start:], keep


class MelStream:
    """`log_mel_spectrogram(load_audio(path, cfg), cfg)` of a file, computed in two passes in flat memory.

    Pass 1 (here): reads the file in blocks, validates it as `prepare_waveform` does, resamples it in blocks
    (`resample_blocks`) and records the resampled length, its peak |sample| and the largest mel amplitude of the
    un-normalised signal (the mel is linear in the waveform's scale, so the normalised maximum follows: max_db).
    Pass 2 (`chunks`, repeatable): reads and resamples again and yields the normalised log-mel in chunks of
    `block_frames` frames, computed with the same `LogMel` steps (normalise, pre-emphasis carried across blocks,
    frames under the window with the STFT's reflect padding at the two file ends, |rfft|, mel, dB, the
    max_db - top_db floor). Equal to the one-pass feature to ~1e-6. Memory: a few blocks, whatever the length.

    Args:
        logmel: the LogMel (its device) to use; a cached CPU one by default.
    """

    def __init__(self, path: str | Path, cfg: FeatureConfig, logmel: LogMel | None = None,
                 block_frames: int = MEL_BLOCK, read_block: int = READ_BLOCK):
        self.path, self.cfg = Path(path), cfg
        self.logmel = logmel if logmel is not None else _cached_logmel(cfg)
        if self.logmel.cfg != cfg:
            raise ValueError("logmel was built for another feature config")
        self.block_frames, self.read_block = max(int(block_frames), 1), int(read_block)
        rate, _ = read_blocks(self.path, self.read_block)
        _check_rate(rate)
        self.rate = rate
        self.low, self.high, self.samples = math.inf, -math.inf, 0
        top = None
        for part in self._mel_parts(None):
            top = part.amax() if top is None else torch.maximum(top, part.amax())
        _check_range(self.low, self.high)
        _check_resampled(self.samples, self._nonzero, cfg)
        dtype = self.logmel.fbank.dtype
        self.peak = self._peak.to(self.logmel.fbank.device, dtype)
        # max over the normalised signal's mel = (max over the raw one) * cfg.peak / peak (linearity), then dB
        self.max_db = self.logmel.db(top / self.peak * cfg.peak)
        self.frames = self.samples // cfg.hop_length + 1

    def _resampled(self, first_pass: bool) -> Iterator[torch.Tensor]:
        rate, blocks = read_blocks(self.path, self.read_block)

        def checked() -> Iterator[np.ndarray]:
            for block in blocks:
                if first_pass:
                    _check_finite(block)
                    self.low, self.high = min(self.low, float(block.min())), max(self.high, float(block.max()))
                yield block

        if first_pass:
            self._peak, self._nonzero = torch.zeros(()), False
        for part in resample_blocks(checked(), rate, self.cfg.sample_rate):
            if first_pass and part.numel():
                self.samples += part.shape[-1]
                self._peak = torch.maximum(self._peak, part.abs().amax())
                self._nonzero = self._nonzero or bool((part != 0).any())
            yield part

    def chunks(self) -> Iterator[torch.Tensor]:
        """Pass 2: normalised log-mel (n_mels, frames_i) chunks tiling the file's `frames` frames, in order."""
        for mel in self._mel_parts(self.peak):
            yield self.logmel.floor(self.logmel.db(mel), self.max_db)[0]

    def _padded(self, buf: torch.Tensor, index: torch.Tensor, end: int, at_end: bool) -> torch.Tensor:
        """buf[index] padded outside the signal as the one-pass STFT pads it (cfg.pad_mode: reflect or zeros).

        Indices are relative to buf; a negative one lies before the file's first sample (buf keeps every sample a
        later frame needs, so it starts at the file's start while such frames remain); `end` (= len(buf)) is the
        file's end when `at_end`, the only time indices reach past it."""
        if self.cfg.pad_mode == "reflect":
            index = index.abs()
            if at_end:
                index = torch.where(index >= end, 2 * (end - 1) - index, index)
            return buf[index]
        outside = (index < 0) | (index >= end)
        return torch.where(outside, 0.0, buf[index.clamp(0, end - 1)])

    def _mel_parts(self, peak: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """Amplitude mel (1, n_mels, f) chunks: pass 1 (peak None: raw signal, first pass) or pass 2 (normalised).

        Frame t takes pre-emphasised samples [t hop - off, t hop - off + win); indices outside [0, N) are padded
        as the whole signal is (cfg.pad_mode), which needs N, known at the end of the file."""
        lm, cfg = self.logmel, self.cfg
        hop, win, off = cfg.hop_length, cfg.win_length, lm.window_offset
        device = lm.fbank.device
        buf = torch.zeros(0, device=device)  # pre-emphasised samples [base, base + len(buf))
        base, done, previous = 0, 0, None  # frames < done are out; previous: last normalised sample
        parts = self._resampled(peak is None)
        for part in itertools.chain(parts, [None]):
            if part is not None:
                x = part.to(device, lm.fbank.dtype)
                if not x.numel():
                    continue
                if peak is not None:
                    x = lm.normalise(x, peak)
                y = lm.preemphasise(x, previous)
                previous = x[-1:]
                buf = torch.cat([buf, y])
                total = base + len(buf)
                ready = (total - win + off) // hop + 1 if total >= win - off else 0  # frames needing no end reflection
                if ready - done < self.block_frames:
                    continue
                last = ready
            else:
                total = base + len(buf)
                if total < min_samples(cfg):  # pass 1 rejects it afterwards with the reference's message
                    return
                last = total // hop + 1
            while done < last and (part is None or last - done >= self.block_frames):
                stop = min(done + self.block_frames, last)
                index = torch.arange(done * hop - off, (stop - 1) * hop - off + win, device=device)
                segment = self._padded(buf, index - base, total - base, at_end=part is None)
                yield lm.mel(segment.unfold(-1, win, hop)[None])  # (1, mels, stop - done)
                done = stop
                keep = max(base, done * hop - off - win)  # reflection at the end reaches back < win samples
                buf, base = buf[keep - base:], keep


def mel_mse_db2(sse: float, n_mels: int, frames: int, top_db: float) -> float:
    """Paper Table 3: sum of squared errors * top_db^2 / (n_mels * compared frames)."""
    return sse * top_db**2 / (n_mels * frames)
