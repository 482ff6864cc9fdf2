"""One training run on the engine: the checkpoint it resumes, initial weights, named state dicts, RNG streams,
the run directory, the writer, checkpoints, the loop and the stop message. A trainer supplies only its
modules, its step and what it logs:

    with engine.session(device) as process:
        run = Run(process, out, resume)                       # rank 0 picks the newest checkpoint
        ...the trainer's configuration (run.state holds the resumed checkpoint, or None)...
        model = run.initial(build, seed)                      # the same weights on every rank
        process.seed_streams(seed)
        start = run.restore({"model": model, "optimizer": optimizer}, total)
        run.set_up(config_text, header)                       # run dir, config.yaml, what checkpoints carry
        result = run.train(trainer, dataset, schedule, quiet)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from rich.console import Console

from sqaudio import checkpoint, distributed
from sqaudio.files import atomic_write
from sqaudio.training.engine import Meter, Process, Stop, fail_together, progress

console = Console(stderr=True)
HISTORY = "history.jsonl"
Built = TypeVar("Built")


@dataclass
class Schedule:
    """How long a run trains and when it logs and saves.

    Args:
        total: the step the run ends at; log_every / checkpoint_every: in steps (both also at the end);
        keep_last: checkpoints kept (0 = all); workers: DataLoader workers.
    """

    total: int
    log_every: int
    checkpoint_every: int
    keep_last: int
    workers: int = 0


@dataclass
class RunResult:
    """What a run reached and wrote (paths on rank 0; `checkpoint` is None elsewhere or when none exists)."""

    step: int
    signal: int | None               # the signal that stopped the run, None when it finished
    statistics: dict[str, float]     # the last logged row (averages plus the trainer's derived values)
    evaluation: dict[str, float]     # the last scores of `Trainer.evaluate`
    steps_run: int
    seconds: float
    checkpoint: Path | None
    config: Path
    history: Path
    logs: Path


class Trainer:
    """What a trainer gives its `Run`: the optimisation step, the row it logs and the progress text keys."""

    progress_keys: tuple[str, ...] = ("loss",)

    def step(self, step: int, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step: (loss, statistics), device tensors (no host sync)."""
        raise NotImplementedError

    def log(self, step: int, averages: dict[str, float]) -> dict[str, float]:
        """The row logged at a log step: the averaged statistics plus derived values (lr, temperature...)."""
        return averages

    def evaluate(self, step: int) -> dict[str, float]:
        """Scores logged at checkpoint steps (rank 0 only; must not touch the RNG streams). None by default."""
        return {}


class Run:
    """One run directory trained by this process (all ranks build one; only rank 0 writes).

    Args:
        process: this process's device and place in the group (`engine.session`).
        out: the run directory. resume: continue its newest checkpoint (refused without it when one exists).
        fmt: the checkpoints' "format" value when they carry one (refuses other run directories).
        logs: the TensorBoard folder inside `out`. label: the progress bar's label.
    """

    def __init__(self, process: Process, out: str | Path, resume: bool, fmt: str | None = None,
                 logs: str = "tensorboard", label: str = "train"):
        self.process, self.out, self.logs, self.label = process, Path(out), logs, label
        self.state = self._resume_state(resume, fmt)
        self.start = int(self.state["step"]) if self.state is not None else 0
        self.modules: dict[str, Any] = {}
        self.header: dict[str, Any] = {}
        self.evaluation: dict[str, float] = {}
        self.keep_last, self.writer, self.trainer = 0, None, None

    def _resume_state(self, resume: bool, fmt: str | None) -> dict[str, Any] | None:
        """Rank 0 picks the newest checkpoint of the run directory and sends it to every rank (the directory
        need only be visible to rank 0). None: start from scratch."""
        message, state = None, None
        if self.process.ctx.is_main:
            found = checkpoint.list_checkpoints(self.out) if self.out.is_dir() else []
            if found and not resume:
                message = f"{self.out} already holds checkpoints; pass --resume to continue or choose a new --out"
            elif found:
                state = checkpoint.load(found[-1])
                if fmt is not None and state.get("format") != fmt:
                    message, state = f"{self.out} does not hold {fmt} checkpoints", None
        message, state = distributed.broadcast_object((message, state))
        if message:
            fail_together(message, self.process.ctx)
        return state

    @staticmethod
    def initial(build: Callable[[], Built], seed: int) -> Built:
        """`build()` under torch's CPU stream seeded with `seed`: the same initial weights on every rank, this
        process's streams untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    def restore(self, modules: dict[str, Any], total: int) -> int:
        """Name the modules (and optimizers, schedulers) a checkpoint holds; when resuming, load their states
        and this rank's RNG streams and say where the run continues. Returns the step to start from."""
        self.modules = modules
        if self.state is not None:
            for name, module in modules.items():
                module.load_state_dict(self.state[name])
            self.process.restore_rng(self.state, self.start)
            if self.process.ctx.is_main:  # even with --quiet: where a run continues is never a guess
                console.print(f"resuming from step {self.start} to step {total} ({self.out})", soft_wrap=True)
        return self.start

    def set_up(self, config_text: str, header: dict[str, Any]) -> None:
        """Rank 0 prepares the run directory: removes stale temporaries, writes config.yaml and drops logged rows
        past the resumed step. `header` is saved in every checkpoint beside the named states."""
        self.header = header
        if not self.process.ctx.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(self.out)
        atomic_write(self.out / "config.yaml", lambda tmp: tmp.write_text(config_text))
        history = self.out / HISTORY
        if history.exists():
            rows = [line for line in history.read_text().splitlines() if json.loads(line)["step"] <= self.start]
            history.write_text("".join(row + "\n" for row in rows))

    def save(self, step: int) -> None:
        """At checkpoint steps, the end and a stop (all ranks: their RNG streams are gathered): rank 0 logs the
        trainer's evaluation, then writes checkpoint-<step>.pt. The step the run started from is not saved
        again (nothing new)."""
        if step == self.start:
            return
        rngs = self.process.rng_states()
        if not self.process.ctx.is_main:
            return
        scores = self.trainer.evaluate(step)
        for key, value in scores.items():
            self.writer.add_scalar(key, value, step)
        self.evaluation.update(scores)
        states = {name: module.state_dict() for name, module in self.modules.items()}
        checkpoint.save_step({**self.header, **states, "step": step, **rngs}, self.out, step, self.keep_last)

    def train(self, trainer: Trainer, dataset, schedule: Schedule, quiet: bool) -> RunResult:
        """The training loop: `dataset[step]` is this rank's batch of a step. A stop (SIGINT/SIGTERM) is taken at
        a step boundary, before the forward, so the state saved then is exactly that after the last step.
        Statistics are read (one host sync, the NaN check) on log and checkpoint steps only."""
        from torch.utils.tensorboard import SummaryWriter

        main, started = self.process.ctx.is_main, time.perf_counter()
        self.trainer, self.keep_last = trainer, schedule.keep_last
        self.writer = SummaryWriter(str(self.out / self.logs)) if main else None
        last: dict[str, float] = {}
        meter, reached = Meter(self.process.ctx), self.start
        try:
            with Stop(self.process.ctx) as stop, progress(self.label, quiet or not main) as bar:
                task = bar.add_task("", total=schedule.total, completed=reached)
                for step, batch in self.process.batches(dataset, self.start, schedule.total, schedule.workers):
                    if stop.requested():
                        break
                    loss, values = trainer.step(step, batch)
                    reached = step + 1
                    meter.add(step, values, loss)
                    log = reached % schedule.log_every == 0 or reached == schedule.total
                    save = reached % schedule.checkpoint_every == 0 or reached == schedule.total
                    if log or save:
                        averages = meter.read(reached, self.out, reset=log)
                        if log:
                            last = self._log(reached, trainer.log(reached, averages))
                            bar.update(task, description=self._describe(last, trainer.progress_keys))
                    bar.update(task, completed=reached)
                    if save:
                        self.save(reached)
                if stop.signal is not None:
                    meter.read(reached, self.out)
                    self.save(reached)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self._result(reached, stop.signal, last, time.perf_counter() - started)

    def _log(self, step: int, row: dict[str, float]) -> dict[str, float]:
        """Rank 0 writes the row to TensorBoard (train/<key>) and appends it to history.jsonl."""
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            with open(self.out / HISTORY, "a") as history:
                history.write(json.dumps({"step": step, **row}) + "\n")
        return row

    @staticmethod
    def _describe(row: dict[str, float], keys: tuple[str, ...]) -> str:
        return " ".join(f"{key}={row[key]:.4g}" for key in keys if key in row)

    def _result(self, step: int, signal: int | None, last: dict[str, float], seconds: float) -> RunResult:
        found = checkpoint.list_checkpoints(self.out) if self.process.ctx.is_main and self.out.is_dir() else []
        if signal is not None and self.process.ctx.is_main:
            saved = f"saved checkpoint at step {step}" if step != self.start else "nothing new to save"
            console.print(f"interrupted by signal {signal}: {saved} in {self.out}; continue with --resume",
                          soft_wrap=True)
        return RunResult(step, signal, last, dict(self.evaluation), step - self.start, seconds,
                         found[-1] if found else None, self.out / "config.yaml", self.out / HISTORY,
                         self.out / self.logs)
