"""The training engine every trainer shares: devices and process groups (`session` -> `Process`), data
loading, RNG streams, signals, the NaN/stop agreement and on-device statistics. `sqaudio.training.run.Run`
builds one run (resume, checkpoints, logging, the loop) on top of it; a trainer's step draws its noise under
`process.noise(step)` (keyed Gumbel/jitter noise).

Host syncs: none in the steady-state step (fp16's GradScaler keeps its own one); log and checkpoint steps
read the statistics once. The stop decision travels in a non-blocking all-reduce on a CPU (gloo) group that
is waited for one step later, so all ranks stop at the same step without waiting for each other.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sqaudio import checkpoint, distributed
from sqaudio.data.batches import step_generator
from sqaudio.distributed import pick_device
from sqaudio.errors import UserError
from sqaudio.models import noise

console = Console(stderr=True)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RankExit(SystemExit):
    """Leave a rank with exit code 2 without printing: another rank (or the launcher) reports the error."""

    def __init__(self):
        super().__init__(2)


class SharedError(UserError):
    """An error the ranks agreed on, reported by rank 0 alone (its message names a rank where that matters)."""


def fail_together(message: str, ctx: distributed.Context) -> None:
    """An error every rank reached at the same point: rank 0 reports it (one line), the others leave quietly."""
    if ctx.is_main:
        raise SharedError(message)
    raise RankExit()


@contextlib.contextmanager
def together(ctx: distributed.Context) -> Iterator[None]:
    """Checks that run on every rank with no collective inside: the ranks then compare their UserErrors (one
    gather, a collective) and all stop when any failed. Rank 0 reports the lowest failing rank's error, with
    "rank r: " in front unless every rank failed alike; one process raises its error as it is."""
    message = None
    try:
        yield
    except UserError as err:
        if ctx.world == 1:
            raise
        message = str(err)
    messages = distributed.gather_object(message)
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if failed:
        rank, text = failed[0]
        alike = len(failed) == ctx.world and all(other == text for _, other in failed)
        fail_together(text if alike else f"rank {rank}: {text}", ctx)


# ------------------------------------------------------------------ RNG streams (weights_only-safe)

def rng_state(dev: torch.device) -> dict[str, Any]:
    """Every RNG stream of this process: torch CPU, this rank's CUDA device, numpy, Python."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, _ = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64)}}


def set_rng_state(state: dict[str, Any] | torch.Tensor, dev: torch.device) -> None:
    """Restore `rng_state` (or, from older checkpoints, a bare torch CPU state)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and dev.type == "cuda":
        torch.cuda.set_rng_state(cuda, dev)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((state["python"]["version"], tuple(int(v) for v in state["python"]["state"]), None))


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank `rank`'s RNG streams started at `step`: rank 0 at step 0 keeps the run's seed (so one
    process is unchanged); every other (rank, step) gets its own stream."""
    return seed if rank == 0 and step == 0 else step_generator(seed, 3, rank, step).initial_seed()


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and Python."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------ signals and the stop agreement

class Stop:
    """SIGINT/SIGTERM request a stop; `requested()` is the decision all ranks share, taken at a step boundary.

    One process: the signal itself. Several: each boundary waits for the all-reduce (MAX) started at the
    previous boundary (long finished: no wait in practice) and starts the next one, so every rank sees the
    same signal at the same step. A second signal is not caught: it ends the process at once.
    """

    def __init__(self, ctx: distributed.Context):
        self.ctx, self.signals = ctx, distributed.StopSignals()
        self.signal: int | None = None
        self._work, self._buf = None, torch.zeros(1, dtype=torch.int64)
        self._group = distributed.control_group() if ctx.world > 1 else None

    def __enter__(self) -> "Stop":
        self.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.__exit__(*exc)
        if self._work is not None and exc[0] is None:
            self._work.wait()

    def requested(self) -> bool:
        if self._group is None:
            self.signal = self.signals.signal
            return self.signal is not None
        if self._work is not None:
            self._work.wait()
            self.signal = int(self._buf[0]) or None
            if self.signal is not None:
                self._work = None
                return True
        self._buf[0] = self.signals.signal or 0
        self._work = torch.distributed.all_reduce(self._buf, torch.distributed.ReduceOp.MAX, group=self._group,
                                                  async_op=True)
        return False


# ------------------------------------------------------------------ statistics on the device

class Meter:
    """Sums of per-step scalars kept on the device; `read()` averages them over steps and ranks (one sync).

    A `nonfinite` count rides along with the sums, so a NaN/inf loss is found at the next read.
    """

    def __init__(self, ctx: distributed.Context):
        self.ctx, self.sums, self.steps, self.first = ctx, {}, 0, None

    def add(self, step: int, values: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        for key, value in {**values, "nonfinite": bad}.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.first = step if self.first is None else self.first
        self.steps += 1

    def read(self, last_step: int, out: Path, reset: bool = True) -> dict[str, float]:
        """Averages over the steps since the last reset and over all ranks (a collective); fails on every
        rank if a loss was not finite. `reset=False` only checks (checkpoint steps between log steps)."""
        if not self.steps:
            return {}
        keys = sorted(self.sums)
        total = distributed.sum_all(torch.stack([self.sums[k] for k in keys]))
        row = dict(zip(keys, (total / (self.steps * self.ctx.world)).tolist()))  # the one host sync
        first = self.first
        if reset:
            self.sums, self.steps, self.first = {}, 0, None
        if row.pop("nonfinite") > 0:
            good = checkpoint.list_checkpoints(out) if out.is_dir() else []
            fail_together(f"non-finite loss between steps {first + 1} and {last_step} (mean loss "
                          f"{row.get('loss', float('nan'))}); stopped without saving (last good checkpoint: "
                          f"{good[-1] if good else 'none'})", self.ctx)
        return row


# ------------------------------------------------------------------ the session

@dataclass
class Process:
    """This process's part of a run: its device, its place in the process group and the run's seed."""

    dev: torch.device
    ctx: distributed.Context
    seed: int = 0

    def seed_streams(self, seed: int) -> None:
        """The run's seed; this rank's torch/numpy/Python streams start from (seed, rank)."""
        self.seed = seed
        seed_all(rank_seed(seed, self.ctx.rank))

    def autocast(self, amp: str):
        """bf16/fp16 autocast on CUDA; full precision elsewhere (recipes name bf16 for GPUs)."""
        dtype = AMP_DTYPES[amp] if self.dev.type == "cuda" else None
        return torch.autocast(self.dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def noise(self, step: int):
        """Gumbel/jitter noise of `step` keyed by each row's global batch position (`sqaudio.noise`)."""
        return noise.keyed(self.seed, step, self.ctx.rank, self.ctx.world)

    def batches(self, dataset, start: int, total: int, workers: int) -> Iterator[tuple[int, Any]]:
        """(step, batch on the device) for steps start..total-1 through a DataLoader.

        `dataset[step]` is the whole (rank-sliced) batch of that step, a pure function of (seed, step), so
        workers, prefetching and resume change nothing about what a step sees. A UserError raised loading a
        step, in a worker too, is raised here as it is (one line), when that step is reached.
        """
        cuda = self.dev.type == "cuda"
        loader = torch.utils.data.DataLoader(
            _Reporting(dataset), batch_size=None, sampler=range(start, total), num_workers=workers,
            pin_memory=cuda, prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
            worker_init_fn=_quiet_worker, generator=torch.Generator())
        for step, batch in zip(range(start, total), loader):
            if isinstance(batch, _Failed):
                raise UserError(batch.message)
            yield step, to_device(batch, self.dev)

    def restore_rng(self, state: dict[str, Any], step: int) -> None:
        """This rank's saved streams when the checkpoint has one per rank of this world size; otherwise
        rank 0 takes the saved rank-0 streams and the others start fresh ones (`rank_seed`)."""
        ranks = state.get("rng_ranks") or []
        if len(ranks) == self.ctx.world:
            set_rng_state(ranks[self.ctx.rank], self.dev)
        elif self.ctx.is_main:
            set_rng_state(state["rng"], self.dev)
        else:
            seed_all(rank_seed(self.seed, self.ctx.rank, step))

    def rng_states(self) -> dict[str, Any]:
        """{"rng": rank 0's streams, "rng_ranks": every rank's} for a checkpoint (a collective)."""
        states = distributed.gather_object(rng_state(self.dev))
        return {"rng": states[0], "rng_ranks": states}


def check_divisible(batch_size: int, world: int, key: str) -> None:
    """Every rank takes an equal slice of each global batch: a UserError when `batch_size` (recipe key `key`)
    does not split over `world` processes."""
    if batch_size % world:
        raise UserError(f"{key} {batch_size} is not divisible by {world} processes (--devices): each takes an "
                        f"equal slice of the global batch")


@dataclass
class _Failed:
    """What a DataLoader worker returns in place of a batch whose loading raised a UserError."""

    message: str


class _Reporting:
    """`dataset[step]`, or a `_Failed` carrying the UserError it raised: the main process then raises that
    error as it is (a worker's own exception would come back wrapped in its traceback)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, step: int):
        try:
            return self.dataset[step]
        except UserError as err:
            return _Failed(str(err))


def to_device(batch, dev: torch.device):
    """A batch (tensor, or a dict/tuple/list of tensors) on `dev`, copied without waiting."""
    if isinstance(batch, dict):
        return {key: to_device(value, dev) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, dev) for value in batch)
    return batch.to(dev, non_blocking=True)


def _quiet_worker(_: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process (which stops at a step boundary)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def set_deterministic(on: bool) -> None:
    """PyTorch's deterministic algorithms (CUDA: cuBLAS workspace, no cuDNN autotuning) when `on`. Ops with
    no deterministic CUDA kernel (e.g. index_add_ for the code counts, whose integer sums are exact anyway)
    warn instead of failing."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any CUDA work
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


@contextlib.contextmanager
def session(device: str | None, deterministic: bool = False) -> Iterator[Process]:
    """Pick the device and join torchrun's process group (one device per local rank); on leaving, tear the
    group down (no barrier when leaving on an error). Under several processes a UserError names its rank
    (unless the ranks agreed on it: `together`), a collective past the timeout is a UserError too, and a
    broken collective (a peer failed and is reported on its own) ends this rank quietly with exit code 2.
    Call `seed_streams` next."""
    dev = pick_device(device)
    set_deterministic(deterministic)
    ctx = distributed.init_from_env(dev)
    ok = False
    try:
        yield Process(_rank_device(dev, ctx), ctx)
        ok = True
    except UserError as err:
        if ctx.world == 1 or isinstance(err, SharedError):
            raise
        raise UserError(f"rank {ctx.rank}: {err}") from None
    except (RuntimeError, torch.distributed.DistError) as err:
        if ctx.world > 1 and distributed.is_timeout(err):
            raise UserError(f"rank {ctx.rank}: a collective waited more than {distributed.timeout().total_seconds():g}"
                            f" s for the other processes ({distributed.TIMEOUT_ENV}): one is stuck or gone") from None
        if ctx.world > 1 and distributed.is_peer_failure(err):
            raise RankExit() from None
        raise
    finally:
        distributed.shutdown(wait=ok)


def _rank_device(dev: torch.device, ctx: distributed.Context) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under several processes on CUDA (NCCL takes one GPU per rank)."""
    if dev.type != "cuda" or ctx.world == 1:
        return dev
    if ctx.local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {ctx.local_rank} has no GPU of its own ({torch.cuda.device_count()} here; one "
                        f"process per GPU)")
    dev = torch.device("cuda", ctx.local_rank)
    torch.cuda.set_device(dev)
    return dev


def progress(label: str, quiet: bool) -> Progress:
    """The training progress bar (stderr): bar, step/total, elapsed, remaining, a short statistics text."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.description}"), console=console, disable=quiet)
