"""Devices and torch.distributed glue: the compute device (never hard-coded), process-group set-up from
torchrun's environment, differentiable sums, and `--devices N` (local processes running this command).

Exactness rule: every rank's loss is either a mean over its local slice of the global batch (DDP averages
those gradients into the global mean) or a term computed from globally summed statistics with the
autograd-aware all_reduce below (identical on every rank). Then a run on N processes follows the same
trajectory as one process with the same global batch, up to float rounding.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
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


def check_world(name: str | None, nproc: int) -> None:
    """`nproc` processes on device `name` (one per GPU on CUDA) and their timeout, checked before any starts
    (UserError)."""
    if nproc < 1:
        raise UserError(f"--devices must be >= 1, got {nproc}")
    timeout()
    device = pick_device(name)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--devices {nproc} needs {nproc} GPUs (one process each) but CUDA has "
                        f"{torch.cuda.device_count()} here")


TIMEOUT_ENV = "SQAUDIO_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # longest wait in a collective (and for the group to form) before a rank gives up


def timeout() -> datetime.timedelta:
    """How long a collective (or forming the group) may wait for the other ranks: $SQAUDIO_DIST_TIMEOUT_S
    seconds, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 1e9:  # also refuses nan and inf
        raise UserError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


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
        limit = timeout()
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=limit)
        except (RuntimeError, dist.DistError) as err:
            if not is_timeout(err):
                raise
            raise UserError(f"rank {os.environ.get('RANK', '?')}: the {world} processes did not all start within "
                            f"{limit.total_seconds():g} s ({TIMEOUT_ENV})") from None
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def sum_all(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks, differentiable (identity outside a process group)."""
    if not active():
        return x
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # its replacement is private API; this one is autograd-aware
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x)


def wrap_ddp(module: torch.nn.Module, device: torch.device, sync_buffers: bool = True) -> torch.nn.Module:
    """`module` in DistributedDataParallel on `device`. `sync_buffers=False` stops the re-broadcast of rank 0's
    buffers before every forward (they are still synced once, when the wrapper is built). Set as an attribute:
    torch 2.14 names the constructor argument `forward_sync_buffers`, earlier releases `broadcast_buffers`,
    and both read the attribute `broadcast_buffers` in forward."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.broadcast_buffers = sync_buffers
    return ddp


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
    return dist.new_group(backend="gloo", timeout=timeout()) if dist.get_backend() != "gloo" else dist.group.WORLD


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


def is_timeout(err: BaseException) -> bool:
    """Whether an error is a collective (or the group's rendezvous) that waited past `timeout()`."""
    text = f"{type(err).__name__} {err}".lower()
    return "timed out" in text or "timeout" in text  # gloo: "Application timeout caused pair closure"


def is_peer_failure(err: BaseException) -> bool:
    """Whether an error comes from a collective whose peer is gone (that peer reports its own error, or the
    launcher reports how it ended). Timeouts are not: see `is_timeout`."""
    if is_timeout(err):
        return False
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(w in text for w in ("connection closed", "connection reset",
                                                                      "gloo", "nccl", "broken pipe"))


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
ERRORS_ENV = "SQAUDIO_ERRORS"  # set by `launch`: the folder where a rank leaves its one-line error
STOPS = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a rank's exit code after a stop it saved for


def report_to_launcher(message: str) -> bool:
    """Under `launch`, leave this rank's one-line error for the launcher, which prints one line for the whole
    job; False elsewhere (the caller prints it)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return False
    (Path(folder) / f"rank-{os.environ.get('RANK', '0')}").write_text(message)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str]) -> int:
    """Run `sqaudio ARGS` in `nproc` local processes (the environment torchrun would give them).

    Returns 0 when all succeed, or 128 + signal when they stopped (and saved) on SIGINT/SIGTERM. A failure
    is one UserError for the job (`_outcome`): the lowest rank's own error, else how a rank was killed. Ranks
    still running GRACE_S seconds after a failure are killed, so a failure never hangs the job. SIGINT
    reaches the workers from the terminal; SIGTERM sent to this launcher is passed on to them.
    """
    with tempfile.TemporaryDirectory(prefix="sqaudio-errors-") as errors:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "sqaudio",
               ERRORS_ENV: errors}
        procs = [subprocess.Popen([sys.executable, "-m", "sqaudio", *args],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
        old = signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
        try:
            killed = _wait_all(procs)
        finally:
            signal.signal(signal.SIGTERM, old)
        return _outcome([p.returncode for p in procs], killed, Path(errors))


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


def _wait_all(procs: list[subprocess.Popen]) -> set[int]:
    """Wait for every rank; GRACE_S seconds after the first failure, kill the ones left (returned)."""
    failed_at, killed = None, set()
    while any(p.poll() is None for p in procs):
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:  # the workers got the SIGINT too: they stop at a step boundary and save
            continue
        if failed_at is None and any(p.returncode not in (None, 0, *STOPS) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for rank, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.add(rank)
    return killed


def _outcome(codes: list[int], killed: set[int], errors: Path) -> int:
    """The job's exit code from its ranks' exit codes (`killed`: the ranks the launcher killed), or its one
    error line (UserError): the lowest rank's reported error; else a rank killed by a signal; else, when
    the ranks only left quietly (exit code 2: a peer was gone), that. Other codes (a stop; a crash whose
    traceback is above) are returned as they are."""
    reported = sorted(errors.glob("rank-*"), key=lambda f: int(f.name.removeprefix("rank-")))
    if reported:
        raise UserError(reported[0].read_text())
    for rank, code in enumerate(codes):
        if code < 0 and rank not in killed:
            raise UserError(f"rank {rank} was killed by signal {-code} ({_signal_name(-code)})")
    failed = [(rank, code) for rank, code in enumerate(codes) if code != 0]
    if not failed:
        return 0
    other = [code for _, code in failed if code > 0 and code != 2]
    if other:
        return other[0]
    raise UserError(f"rank {failed[0][0]} ended without a message (exit code {failed[0][1]})")


def _signal_name(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return "unknown signal"
    hints = {signal.SIGKILL: "out of memory?", signal.SIGABRT: f"NCCL's watchdog after {TIMEOUT_ENV}?"}
    return f"{name}: {hints[signum]}" if signum in hints else name


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
