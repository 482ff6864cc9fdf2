"""Devices and torch.distributed glue: the compute device (never hard-coded), process-group set-up from
torchrun's environment, differentiable sums, and `--devices N` (local processes running this command).

Exactness rule: every rank's loss is either a mean over its local slice of the global batch (DDP averages
those gradients into the global mean) or a term computed from globally summed statistics with the
autograd-aware all_reduce below (identical on every rank). Then a run on N processes follows the same
trajectory as one process with the same global batch, up to float rounding.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sqaudio.errors import UserError


def pick_device(name: str | None) -> torch.device:
    """`auto`/None: CUDA when present, else CPU; otherwise the named device (a UserError if it is not there)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (e.g. auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device '{name}' is not available here (CUDA devices: {torch.cuda.device_count()})")
    return device


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


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of `x` on every rank, in place (identity outside a process group)."""
    if active():
        dist.broadcast(x, src=0)
    return x


def barrier() -> None:
    if active():
        dist.barrier()


def control_group():
    """A CPU (gloo) group for small control messages (the stop flag), beside the NCCL group on GPUs."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (identity in one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a collective: all ranks call it)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def is_peer_failure(err: BaseException) -> bool:
    """Whether an error comes from a collective whose peer is gone (that peer reports its own error)."""
    dist_error = getattr(dist, "DistError", ())
    text = str(err).lower()
    return isinstance(err, dist_error) or any(w in text for w in ("connection closed", "connection reset",
                                                                   "gloo", "nccl", "broken pipe", "timed out"))


def shutdown(wait: bool = True) -> None:
    """Leave the process group: together (a barrier) after success; at once when leaving on an error, where
    a barrier would wait for ranks that are stuck in another collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            dist.barrier()
        dist.destroy_process_group()
    except RuntimeError:  # another rank is already gone: nothing left to wait for
        pass


GRACE_S = 10.0  # how long the other ranks get to leave after one failed, before they are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str]) -> int:
    """Run `sqaudio ARGS` in `nproc` local processes (the environment torchrun would give them).

    Returns 0 when all succeed, else the first failure's code (2 for errors, 128 + signal for a stop); the
    failing rank prints its own one-line error, and ranks still running GRACE_S seconds after a failure are
    killed, so a failure never hangs the job. SIGINT reaches the workers from the terminal; SIGTERM sent to
    this launcher is passed on to them.
    """
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "sqaudio"}
    procs = [subprocess.Popen([sys.executable, "-m", "sqaudio", *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    old = signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
    try:
        return _wait_all(procs)
    finally:
        signal.signal(signal.SIGTERM, old)


def relaunch(command, nproc: int, drop: str = "--devices") -> int:
    """Run the current CLI command again in `nproc` local processes (`launch`): its own parsed arguments,
    rebuilt from its context `command` (a click/Typer context), without the option `drop`."""
    return launch(nproc, command_args(command, drop))


def command_args(command, drop: str) -> list[str]:
    """A click/Typer command context's sub-command words and parsed parameters as an argument list, leaving
    out option `drop` (options absent on the command line appear with their defaults)."""
    words, node = [], command
    while node.parent is not None:  # the sub-command names below the program: ["vocoder", "train"]
        words.insert(0, node.info_name)
        node = node.parent
    for param in command.command.params:
        value = command.params.get(param.name)
        if drop in param.opts or value is None:
            continue
        if param.param_type_name == "argument":
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            words += [param.opts[0]] if value else param.secondary_opts[:1]
        elif param.multiple:
            words += [word for item in value for word in (param.opts[0], str(item))]
        else:
            words += [param.opts[0], str(value)]
    return words


def _wait_all(procs: list[subprocess.Popen]) -> int:
    code, failed_at = 0, None
    while any(p.poll() is None for p in procs):
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:  # the workers got the SIGINT too: they stop at a step boundary and save
            continue
        for p in procs:
            if p.returncode not in (None, 0) and code == 0:
                code, failed_at = p.returncode, time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for p in procs:
        if p.returncode not in (None, 0) and code == 0:
            code = p.returncode
    return 2 if code < 0 else code


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
