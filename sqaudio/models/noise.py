"""Training noise (Gumbel, jitter) as a pure function of (seed, step, global sample index, element).

Under `keyed(seed, step, first, stride)` the rows of a local batch are the global batch positions
first, first + stride, ... (a rank's strided slice, `sqaudio.data.batches.StepBatches`), and `uniform` hashes
(seed, step, draw number, global position, element index) into U[0, 1) on the tensor's own device. So:
ranks draw different noise, a run on W processes draws exactly the noise one process draws for the same
global batch, resume needs no RNG state for it, and CPU and CUDA give the same numbers. Outside `keyed`
(inference, unit tests) `uniform` is `torch.rand`.

The hash is about 40 elementwise integer ops. On CUDA they run as one fused kernel through `torch.compile`
(dynamic shapes; the key enters as kernel scalars, so new steps neither recompile nor copy to the device);
where compilation is unavailable (or TORCHDYNAMO_DISABLE=1) the same function runs eagerly, after one warning.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # element stride of the hash input (2^32 / golden ratio)
_state = threading.local()
_compiled = None      # the compiled `_hashed_uniform` once built; False after it failed


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


def _hashed_uniform(head: int, first: int, stride: int, rows: int, per_row: int, device: torch.device,
                    dtype: torch.dtype) -> Tensor:
    """(rows, per_row) U[0, 1): element j of global row r = first + stride * b is
    mix(mix(mix(r ^ head) + j * _GOLDEN mod 2^32) ^ head) >> 8, times 2^-24 (exact in float32)."""
    row = torch.arange(first, first + stride * rows, stride, device=device, dtype=torch.int64)  # (B,)
    col = torch.arange(0, per_row * _GOLDEN, _GOLDEN, device=device, dtype=torch.int64)        # (per_row,)
    h = _mix(_mix(row ^ head)[:, None] + col[None, :] & _MASK)
    h = _mix(h ^ head)
    return ((h >> 8) * 2.0 ** -24).to(dtype)  # float32 product of a 24-bit integer and 2^-24: exact


def _fused_uniform(*args) -> Tensor:
    """`_hashed_uniform` through torch.compile (built on first use); eager after one warning if that fails."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_hashed_uniform, dynamic=True, fullgraph=True)
    if _compiled is not False:
        try:
            return _compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # no working compiler (Triton, a C++ toolchain): the eager function is the same
            warnings.warn(f"keyed training noise runs eagerly: torch.compile failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})", RuntimeWarning, stacklevel=3)
            _compiled = False
    return _hashed_uniform(*args)


def uniform(shape: tuple[int, ...] | torch.Size, device: torch.device | str, dtype=torch.float32,
            compiled: bool | None = None) -> Tensor:
    """U[0, 1) noise of `shape` (batch rows first): keyed inside `keyed(...)`, else torch.rand.

    compiled: run the keyed hash through torch.compile (None: on CUDA devices); the values are the same.
    """
    device = torch.device(device)
    key = getattr(_state, "key", None)
    if key is None:
        return torch.rand(shape, device=device, dtype=dtype)
    seed, step, first, stride, draw = key
    key[4] += 1  # every draw of a step gets its own stream
    head = _mix(seed ^ _mix((step ^ (draw << 24)) & _MASK))  # a Python int: no device work
    fused = device.type == "cuda" if compiled is None else compiled
    draw_fn = _fused_uniform if fused else _hashed_uniform
    return draw_fn(head, first, stride, shape[0], math.prod(shape[1:]), device, dtype).reshape(shape)
