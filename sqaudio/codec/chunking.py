"""Long inputs in bounded memory: a sequence model run on overlapping windows, stitched with crossfades.

`overlap_apply` cuts a sequence of `length` steps into cores of about `chunk` steps, runs the model on each
core widened by `context` steps per side (what the model needs to see to behave as on the whole sequence)
and keeps each core's output. With `fade`, neighbouring outputs are crossfaded linearly over `fade` steps
centred on each core boundary, so a model with long memory (a GRU) or a phase of its own (a vocoder) leaves
no seam; without it (discrete codes) cores are cut hard, exact when `context` covers the receptive field.
`overlap_stream` yields the same output piece by piece, and `Rolling` reads forward-moving windows out of such
a stream, so stages chain (features -> encoder, decoder -> vocoder -> file) without holding a whole signal.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch


def spans(length: int, chunk: int, context: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) per window; cores tile [0, length) in near-equal parts <= chunk."""
    n = max(1, math.ceil(length / max(chunk, 1)))
    cuts = [round(i * length / n) for i in range(n + 1)]
    return [(max(0, a - context), min(length, b + context), a, b) for a, b in zip(cuts, cuts[1:])]


def overlap_apply(fn: Callable[[int, int], torch.Tensor], length: int, chunk: int, context: int, scale: int = 1,
                  fade: int = 0, on_window: Callable[[], None] | None = None) -> torch.Tensor:
    """Stitch fn(start, stop) -> (..., (stop - start) * scale) over windows into (..., length * scale).

    Args:
        fn: the model on input steps [start, stop).
        length: input steps; chunk: core size; context: extra steps per side (fade <= 2 * context).
        scale: output steps per input step (2 for the SQ-VAE decoder, hop for a vocoder).
        fade: crossfade length in input steps (0: hard cuts, any dtype); at most chunk / 2.
        on_window: called after each window (progress).
    """
    return torch.cat(list(overlap_stream(fn, length, chunk, context, scale, fade, on_window)), dim=-1)


def overlap_stream(fn: Callable[[int, int], torch.Tensor], length: int, chunk: int, context: int, scale: int = 1,
                   fade: int = 0, on_window: Callable[[], None] | None = None) -> Iterator[torch.Tensor]:
    """`overlap_apply` yielding its output in order, piece by piece, as soon as each piece is final.

    A window's output is final up to the start of the next window's crossfade; only that crossfade (fade *
    scale steps) is carried to the next window, so memory is one window whatever `length` is.
    """
    fade = min(fade, 2 * context, chunk // 2)
    left, right = fade // 2, fade - fade // 2
    ramp, tail = None, None  # tail: the previous window's output over the next crossfade
    for start, stop, a, b in spans(length, chunk, context):
        y = fn(start, stop)
        release_freed_memory()
        if ramp is None:
            ramp = (torch.arange(fade * scale, device=y.device, dtype=torch.float32) + 0.5) / max(fade * scale, 1)
        if fade == 0:
            final = y[..., (a - start) * scale:(b - start) * scale]
        else:
            lo, hi = (a - left if a > 0 else a), (b + right if b < length else b)
            piece = y[..., (lo - start) * scale:(hi - start) * scale].clone()
            if a > 0:
                piece[..., :fade * scale] *= ramp.to(piece.dtype)
                piece[..., :fade * scale] += tail
            final = piece
            if b < length:
                piece[..., -fade * scale:] *= ramp.flip(0).to(piece.dtype)
                cut = (b - left - lo) * scale
                final, tail = piece[..., :cut], piece[..., cut:]
        if on_window is not None:
            on_window()  # before the yield: a consumer that stops reading still sees every window counted
        yield final


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`; nothing elsewhere).

    A window frees its activations when it ends, but glibc keeps freed heap memory, and windows of slightly
    different sizes fragment it, so without this the resident set creeps up window after window although nothing
    is held (measured, hifigan vocoder, 7 minutes of input in one process: 530 MB kept above the loaded models;
    with it, 10-25 MB). After each window it returns to what is live; the peak stays that of one window."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only: musl has none)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


class Rolling:
    """Forward-only windows [start, stop) over a sequence that arrives as pieces along the last axis.

    `read` may be called with non-decreasing starts; pieces wholly before the latest start are dropped, so
    memory is the widest window plus one piece, however long the sequence is.
    """

    def __init__(self, pieces: Iterable[torch.Tensor]):
        self._pieces = iter(pieces)
        self._held: list[torch.Tensor] = []
        self._base = 0  # sequence index of the first held step
        self._end = 0   # sequence index after the last held step

    def read(self, start: int, stop: int) -> torch.Tensor:
        if start < self._base:
            raise ValueError(f"Rolling.read({start}, {stop}) went back before {self._base}")
        while self._end < stop:
            piece = next(self._pieces, None)
            if piece is None:
                raise ValueError(f"Rolling.read({start}, {stop}): the sequence ends at {self._end}")
            self._held.append(piece)
            self._end += piece.shape[-1]
        while self._held and self._base + self._held[0].shape[-1] <= start:
            self._base += self._held.pop(0).shape[-1]
        pieces = [self._held[0][..., start - self._base:]] + self._held[1:]  # steps before start are let go
        held = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        self._held, self._base = [held], start
        return held[..., :stop - start]
