"""The log-mel of a long file in flat memory (`reconstruct`, `encode`): the same feature, streamed.

`MelStream` makes two passes over the file (pass 1: peak of the resampled signal and the largest mel value;
pass 2: the log-mel in chunks), applying the steps of `LogMel` to blocks (`normalise`, `preemphasise`, `mel`,
`db`, `floor`), with `resample_blocks` resampling block by block with the filter's context. The tests hold the
streamed feature to `log_mel_spectrogram(load_audio(...))` (1e-6).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf
import torch

from sqaudio.config import FeatureConfig
from sqaudio.data.audio import (
    KAISER_BEST,
    AudioError,
    check_finite,
    check_range,
    check_rate,
    check_resampled,
    down_mix,
    min_samples,
    resample,
    unreadable,
)
from sqaudio.data.features import LogMel, cached_log_mel

READ_BLOCK = 1 << 16     # input frames per file read in the streaming path
RESAMPLE_CALL = 1 << 16  # input samples per resample call at least: torch picks its conv1d algorithm by size, and
                         # calls this long use the whole-signal call's (bit-identical output, measured 8-48 kHz)
MEL_BLOCK = 1000         # log-mel frames per streamed chunk (10 s at 16 kHz / hop 160)


def read_blocks(path: str | Path, block: int = READ_BLOCK) -> tuple[int, Iterator[np.ndarray]]:
    """(sample rate, iterator of float32 mono blocks) of a file, read `block` frames at a time (as `read_audio`,
    down-mixed the same way). Raises AudioError when the file cannot be opened or read, or holds no samples."""
    try:
        handle = sf.SoundFile(str(path))  # opened once: its header gives the rate, its frames the blocks
    except Exception as err:
        raise unreadable(err) from None

    def blocks() -> Iterator[np.ndarray]:
        seen = 0
        try:
            with handle as f:
                while True:
                    data = f.read(block, dtype="float32", always_2d=True)
                    if not len(data):
                        break
                    seen += len(data)
                    yield down_mix(data)
        except AudioError:
            raise
        except Exception as err:
            raise unreadable(err) from None
        if not seen:
            raise AudioError("empty audio (no samples)")

    return handle.samplerate, blocks()


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
    divisor = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // divisor, int(new_rate) // divisor
    width = math.ceil(KAISER_BEST["lowpass_filter_width"] * orig / (min(orig, new) * KAISER_BEST["rolloff"]))
    context = -(-width // orig) + 1  # units of context per side
    buf, start, done = np.zeros(0, np.float32), 0, 0  # buf holds input [start, start + len(buf)); units < done out
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            buf = np.concatenate([buf, np.asarray(block, dtype=np.float32)])
            ready = (start + len(buf) - width) // orig  # units whose input lies in what was read
            first_input = max(0, (done - context) * orig)
            if ready - done < 1 or ready * orig + width - first_input < RESAMPLE_CALL:
                continue
            stop = ready * orig + width
        else:  # the end: one call of at least RESAMPLE_CALL samples (or the whole file), as the whole-signal call
            ready, stop = None, start + len(buf)
            first_input = max(0, min((done - context) * orig, (stop - RESAMPLE_CALL) // orig * orig))
        out = resample(torch.from_numpy(buf[first_input - start:stop - start]), orig_rate, new_rate)
        first = (done - first_input // orig) * new
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
        self.logmel = logmel if logmel is not None else cached_log_mel(cfg)
        if self.logmel.cfg != cfg:
            raise ValueError("logmel was built for another feature config")
        self.block_frames, self.read_block = max(int(block_frames), 1), int(read_block)
        self.low, self.high, self.samples = math.inf, -math.inf, 0
        top = None
        for part in self._mel_parts(None):
            top = part.amax() if top is None else torch.maximum(top, part.amax())
        check_range(self.low, self.high)
        check_resampled(self.samples, self._nonzero, cfg)
        dtype = self.logmel.fbank.dtype
        self.peak = self._peak.to(self.logmel.fbank.device, dtype)
        # max over the normalised signal's mel = (max over the raw one) * cfg.peak / peak (linearity), then dB
        self.max_db = self.logmel.db(top / self.peak * cfg.peak)
        self.frames = self.samples // cfg.hop_length + 1

    def _resampled(self, first_pass: bool) -> Iterator[torch.Tensor]:
        rate, blocks = read_blocks(self.path, self.read_block)  # one open of the file per pass
        if first_pass:
            check_rate(rate)
            self.rate = rate

        def checked() -> Iterator[np.ndarray]:
            for block in blocks:
                if first_pass:
                    check_finite(block)
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

        Frame t takes pre-emphasised samples [t hop - offset, t hop - offset + win); indices outside [0, N) are padded
        as the whole signal is (cfg.pad_mode), which needs N, known at the end of the file."""
        log_mel, cfg = self.logmel, self.cfg
        hop, win, offset = cfg.hop_length, cfg.win_length, log_mel.window_offset
        device = log_mel.fbank.device
        buf = torch.zeros(0, device=device)  # pre-emphasised samples [base, base + len(buf))
        base, done, previous = 0, 0, None  # frames < done are out; previous: last normalised sample
        parts = self._resampled(peak is None)
        for part in itertools.chain(parts, [None]):
            if part is not None:
                x = part.to(device, log_mel.fbank.dtype)
                if not x.numel():
                    continue
                if peak is not None:
                    x = log_mel.normalise(x, peak)
                y = log_mel.preemphasise(x, previous)
                previous = x[-1:]
                buf = torch.cat([buf, y])
                total = base + len(buf)
                # frames that need no reflection at the file's end
                ready = (total - win + offset) // hop + 1 if total >= win - offset else 0
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
                index = torch.arange(done * hop - offset, (stop - 1) * hop - offset + win, device=device)
                segment = self._padded(buf, index - base, total - base, at_end=part is None)
                yield log_mel.mel(segment.unfold(-1, win, hop)[None])  # (1, mels, stop - done)
                done = stop
                keep = max(base, done * hop - offset - win)  # reflection at the end reaches back < win samples
                buf, base = buf[keep - base:], keep

