"""Training noise (Gumbel, jitter) as a pure function of (seed, step, global sample index, element).

Under `keyed(seed, step, first, stride)` the rows of a local batch are the global batch positions
first, first + stride, ... (a rank's strided slice, `sqaudio.data.batches.StepBatches`), and `uniform` hashes
(seed, step, draw number, global position, element index) into U[0, 1) on the tensor's own device. So:
ranks draw different noise, a run on W processes draws exactly the noise one process draws for the same
global batch, resume needs no RNG state for it, and CPU and CUDA give the same numbers. Outside `keyed`
(inference, unit tests) `uniform` is `torch.rand`.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_state = threading.local()


@contextlib.contextmanager
def keyed(seed: int, step: int, first: int = 0, stride: int = 1):
    """Draw the noise of training step `step` for the batch rows at global positions first + stride * b."""
    old = getattr(_state, "key", None)
    _state.key = [seed & _MASK, step & _MASK, first, stride, 0]
    try:
        yield
    finally:
        _state.key = old


def _mix(x):
    """A 32-bit integer hash (lowbias32, C. Wellons) of Python ints or int64 tensors holding values < 2^32
    (int64 products wrap; their low 32 bits, all that is kept, are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def uniform(shape: tuple[int, ...] | torch.Size, device: torch.device, dtype=torch.float32) -> Tensor:
    """U[0, 1) noise of `shape` (batch rows first): keyed inside `keyed(...)`, else torch.rand."""
    key = getattr(_state, "key", None)
    if key is None:
        return torch.rand(shape, device=device, dtype=dtype)
    seed, step, first, stride, draw = key
    key[4] += 1  # every draw of a step gets its own stream
    rows = shape[0]
    per_row = 1
    for n in shape[1:]:
        per_row *= n
    head = _mix(seed ^ _mix((step ^ (draw << 24)) & _MASK))  # a Python int: no device work
    row = first + stride * torch.arange(rows, device=device, dtype=torch.int64)        # (B,) global positions
    h = _mix(_mix(row ^ head)[:, None] + torch.arange(per_row, device=device, dtype=torch.int64)[None, :] * 0x9E3779B1
             & _MASK)                                                                  # (B, per_row)
    h = _mix(h ^ head)
    return ((h >> 8).to(dtype) * 2.0 ** -24).reshape(shape)
