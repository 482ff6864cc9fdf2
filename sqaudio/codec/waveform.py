"""Vocoder output -> samples -> 16-bit PCM wav files, block by block in flat memory."""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from sqaudio.files import atomic_write

SPOOL_BLOCK = 1 << 18     # samples per read when a whole-signal vocoder finish reads its spool back


def finished(vocoder, wav: Iterable[torch.Tensor], samples: int, spool: Path | None = None
             ) -> Iterator[np.ndarray]:
    """Pieces (1, n_i) of a `Vocoder`'s `generate` -> float32 output blocks of exactly `samples` samples in all,
    after its `finish`.

    A whole-signal finish (Griffin-Lim's peak scaling) needs the peak before the first block can go out: the
    raw pieces are spooled to the float32 file `spool` (or held, without one) and read back in blocks."""
    if not vocoder.whole_signal_finish:
        yield from _exact((vocoder.finish(w)[0].cpu().numpy() for w in wav), samples)
        return
    peak, held = None, []
    with (open(spool, "w+b") if spool is not None else nullcontext()) as f:
        for w in wav:
            m = w.abs().amax(dim=-1, keepdim=True)
            peak = m if peak is None else torch.maximum(peak, m)
            if f is None:
                held.append(w)
            else:
                f.write(w[0].cpu().numpy().astype(np.float32).tobytes())
        if f is not None:
            f.seek(0)
            held = (torch.from_numpy(np.frombuffer(f.read(SPOOL_BLOCK * 4), np.float32).copy())[None].to(peak)
                    for _ in itertools.count())
            held = itertools.takewhile(lambda w: w.numel() > 0, held)
        yield from _exact((vocoder.finish_with(w, peak)[0].cpu().numpy() for w in held), samples)


def _exact(blocks: Iterable[np.ndarray], samples: int) -> Iterator[np.ndarray]:
    """The blocks cut (or padded with zeros) to exactly `samples` samples in all."""
    left = samples
    for block in blocks:
        if left > 0:
            yield block[:left]
        left -= len(block)
    if left > 0:
        yield np.zeros(left, np.float32)


def write_vocoded(target: Path, vocoder, wav: Iterable[torch.Tensor], samples: int, rate: int) -> None:
    """Vocoder pieces -> `target` (16-bit PCM wav, atomic; a whole-signal finish spools next to it)."""
    def write(tmp: Path) -> None:
        spool = tmp.with_name(tmp.name + ".f32")
        try:
            write_blocks(tmp, finished(vocoder, wav, samples, spool), rate)
        finally:
            spool.unlink(missing_ok=True)

    atomic_write(Path(target), write)


def write_wav(path: Path, wav: np.ndarray, rate: int) -> None:
    """Write a 16-bit PCM wav atomically."""
    atomic_write(path, lambda tmp: write_blocks(tmp, [wav], rate))


def write_blocks(path: Path, blocks: Iterable[np.ndarray], rate: int) -> None:
    """Float blocks -> one 16-bit PCM mono wav at `path` (clipped to [-1, 1]), written block by block."""
    import soundfile as sf

    with sf.SoundFile(str(path), "w", rate, 1, subtype="PCM_16", format="WAV") as f:
        for block in blocks:
            f.write(np.clip(block, -1, 1))
