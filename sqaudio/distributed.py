"""torch.distributed glue: process-group set-up from torchrun's environment and differentiable sums.

Exactness rule: every rank's loss is either a mean over its local slice of the global batch (DDP averages
those gradients into the global mean) or a term computed from globally summed statistics with the
autograd-aware all_reduce below (identical on every rank). Then a run on N processes follows the same
trajectory as one process with the same global batch, up to float rounding.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: torch.device) -> Context:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def sum_all(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks, differentiable (identity outside a process group)."""
    if not active():
        return x
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # its replacement is private API; this one is autograd-aware
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x)


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together (a rank tearing gloo down under another can abort it)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # another rank is already gone (e.g. it failed): nothing left to wait for
            pass
        dist.destroy_process_group()


def launch(nproc: int, args: list[str]) -> int:
    """Run `sqaudio ARGS` in `nproc` local processes with torchrun; returns the exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sqaudio", *args]
    proc = subprocess.Popen(cmd)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the workers got the SIGINT too: wait while they save and exit
            continue


class StopSignals:
    """SIGINT/SIGTERM set the flag (the loop saves and exits); a second signal interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
