"""Long inputs in bounded memory: a sequence model run on overlapping windows, stitched with crossfades.

`overlap_apply` cuts a sequence of `length` steps into cores of about `chunk` steps, runs the model on each
core widened by `context` steps per side (what the model needs to see to behave as on the whole sequence)
and keeps each core's output. With `fade`, neighbouring outputs are crossfaded linearly over `fade` steps
centred on each core boundary, so a model with long memory (a GRU) or a phase of its own (a vocoder) leaves
no seam; without it (discrete codes) cores are cut hard, exact when `context` covers the receptive field.
"""
from __future__ import annotations

import math
from typing import Callable

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
    fade = min(fade, 2 * context, chunk // 2)
    left, right = fade // 2, fade - fade // 2
    ramp = None
    out = None
    for start, stop, a, b in spans(length, chunk, context):
        y = fn(start, stop)
        if out is None:
            out = y.new_zeros(*y.shape[:-1], length * scale)
            ramp = (torch.arange(fade * scale, device=y.device, dtype=torch.float32) + 0.5) / max(fade * scale, 1)
        if fade == 0:
            out[..., a * scale:b * scale] = y[..., (a - start) * scale:(b - start) * scale]
        else:
            lo, hi = (a - left if a > 0 else a), (b + right if b < length else b)
            piece = y[..., (lo - start) * scale:(hi - start) * scale].clone()
            if a > 0:
                piece[..., :fade * scale] *= ramp.to(piece.dtype)
            if b < length:
                piece[..., -fade * scale:] *= ramp.flip(0).to(piece.dtype)
            out[..., lo * scale:hi * scale] += piece
        if on_window is not None:
            on_window()
    return out
