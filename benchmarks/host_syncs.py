"""Host syncs of a training step: counted (reads into Python, CUDA's own sync reports) and located (the first one).

`SyncCounter` counts while active: reads of a tensor's value into Python made by sqaudio's code (`item`,
`tolist`, `__bool__`, `__float__`, `__int__`, `__index__`, `numpy`, `cpu` are wrapped and counted when the
caller is in sqaudio or a benchmark; on a CPU run these are the reads that could block on an accelerator) and,
on CUDA, the synchronisations CUDA reports under `torch.cuda.set_sync_debug_mode("warn")` (one warning each).
`first_sync` runs steps under `set_sync_debug_mode("error")` and names the source line of the first sync.
"""
from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable

SKIP_CPU = "skipped: cpu"  # a CUDA-only measurement on a CPU run
BENCHMARKS = str(Path(__file__).resolve().parent)


def cuda_only(cuda: bool, value):
    """`value` (called first when callable) on CUDA, else the marker of a CUDA-only measurement that was skipped."""
    if not cuda:
        return SKIP_CPU
    return value() if callable(value) else value


class SyncCounter:
    """Counts reads of tensor values into Python (and CUDA's own sync reports) while active."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")

    def __init__(self, cuda: bool):
        self.cuda, self.reads, self.cuda_syncs, self._saved = cuda, 0, 0, {}

    def __enter__(self):
        import torch

        import sqaudio

        package = str(Path(sqaudio.__file__).parent)
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _f=original, **k):
                caller = sys._getframe(1).f_code.co_filename
                self.reads += caller.startswith((package, BENCHMARKS))
                return _f(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        if self.cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self._log = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self.cuda_syncs = sum("synchroniz" in str(w.message) for w in self._log)
            self._warnings.__exit__(*exc)


def first_sync(step: Callable[[int], object], steps: range) -> dict | None:
    """Run `step(s)` for s in `steps` under CUDA's sync debug mode "error"; None when no step synchronised, else
    where the first sync was raised: the innermost sqaudio (or benchmark) frame and the innermost frame overall."""
    import torch

    import sqaudio

    package = str(Path(sqaudio.__file__).parent)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in steps:
            step(s)
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        frames = traceback.extract_tb(err.__traceback__)
        ours = [f for f in frames if f.filename.startswith((package, BENCHMARKS))]
        return {"step": s, "where": _frame(ours[-1]) if ours else None, "innermost": _frame(frames[-1]),
                "message": str(err).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return None


def _frame(frame: traceback.FrameSummary) -> str:
    """`path:line: code`, the path relative to the repository or site-packages."""
    parts = Path(frame.filename).parts
    for anchor in ("sqaudio", "benchmarks", "torch"):
        if anchor in parts:
            parts = parts[len(parts) - 1 - parts[::-1].index(anchor):]
            break
    return f"{'/'.join(parts)}:{frame.lineno}: {(frame.line or '').strip()}"
