"""One trainer for speech and images: recipe + data -> run directory with checkpoints, logs and plots."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from sqaudio import checkpoint, distributed
from sqaudio.config import (
    FeatureConfig,
    Recipe,
    TemperatureConfig,
    feature_mismatch,
    saved_recipe,
    to_dict,
    validate_recipe,
)
from sqaudio.data.batches import StepBatches, image_batches, speech_batches
from sqaudio.data.store import open_store
from sqaudio.errors import UserError
from sqaudio.models.sqvae import SQVAE, build_model
from sqaudio.plots import plot_annealing
from sqaudio.training import engine

console = Console(stderr=True)
HISTORY = "history.jsonl"


def temperature(cfg: TemperatureConfig, step: int) -> float:
    """Gumbel-softmax temperature at a step: max(min, init * exp(-decay * step))."""
    return max(cfg.min, cfg.init * math.exp(-cfg.decay * step))


@dataclasses.dataclass
class TrainingData:
    batches: StepBatches
    speakers: list[str]
    features: FeatureConfig | None
    validation: Any = None       # images: the held-out set the plateau schedule is stepped on


def load_training_data(recipe: Recipe, data: str | Path, rank: int = 0, world: int = 1) -> TrainingData:
    """Training batches for a recipe; speech recipes also fix the speaker table and check the features."""
    if recipe.data.kind == "speech":
        store = open_store(data)
        diff = feature_mismatch(recipe.features, store.features)
        if diff:
            raise UserError(f"recipe features do not match the prepared data in {data}: {'; '.join(diff)}")
        batches = speech_batches(store, recipe.data, store.speakers, recipe.train.seed, rank, world)
        return TrainingData(batches, store.speakers, store.features)
    from sqaudio.data.images import build_image_datasets

    train_set, val_set = build_image_datasets(recipe.data, data or recipe.data.root)
    return TrainingData(image_batches(train_set, recipe.data, recipe.train.seed, rank, world), [], None, val_set)


def build_optimizer(model: torch.nn.Module, recipe: Recipe):
    cfg = recipe.train
    cuda = next(model.parameters()).is_cuda
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, **({"fused": True} if cuda else {}))  # one kernel on GPUs
    if cfg.lr_schedule == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
    elif cfg.lr_schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.gamma, patience=3)
    elif cfg.lr_schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise UserError(f"unknown train.lr_schedule '{cfg.lr_schedule}' (valid: multistep, plateau, constant)")
    return opt, sched


def resumed_recipe(state: dict[str, Any], recipe: Recipe, overrides: list[str]) -> Recipe:
    """The saved configuration of the run being resumed, with only the `--set` overrides changed."""
    saved = state["recipe"]
    if recipe.name != saved.get("name"):
        raise UserError(f"this run was trained with recipe '{saved.get('name')}', not '{recipe.name}': resume "
                        f"with the same recipe (its saved config is used; change settings with --set)")
    return saved_recipe(saved, resuming=True, overrides=overrides)


def train(recipe: Recipe, data: str | Path, out: str | Path, resume: bool = False,
          device: str | None = None, quiet: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train `recipe` on `data` into run directory `out`; returns the last logged statistics, plus "step"
    and "interrupted" (the signal number that stopped the run, or None).

    `resume` continues the newest checkpoint with its saved configuration, with `overrides` (the `--set`
    items) changing only what they name; with `overrides=None` (a caller that built `recipe` itself) the
    given recipe is used instead. Under torchrun (WORLD_SIZE > 1) each process takes its slice of every
    global batch (DistributedDataParallel); only rank 0 writes checkpoints, logs and progress.
    """
    out = Path(out)
    validate_recipe(recipe)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.data.batch_size % world:  # before joining: every rank fails alike at once
        raise UserError(f"data.batch_size {recipe.data.batch_size} is not divisible by {world} processes")
    with engine.session(device, recipe.train.deterministic) as eng:
        ctx = eng.ctx
        state = eng.resume_state(out, resume)
        if state is not None and overrides is not None:
            recipe = resumed_recipe(state, recipe, overrides)
            validate_recipe(recipe)
        eng.seed_streams(recipe.train.seed)
        if recipe.data.batch_size % ctx.world:
            engine.fail_together(f"data.batch_size {recipe.data.batch_size} is not divisible by {ctx.world} "
                                 f"processes", ctx)
        td = load_training_data(recipe, data, ctx.rank, ctx.world)
        if recipe.model.kind == "speech" and recipe.model.speech.n_speakers == 0:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(
                recipe.model, speech=dataclasses.replace(recipe.model.speech, n_speakers=len(td.speakers))))
        total = recipe.train.epochs * td.batches.steps_per_epoch if recipe.train.epochs > 0 else recipe.train.steps
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, streams untouched
            torch.manual_seed(recipe.train.seed)
            model = build_model(recipe)
        model = model.to(eng.dev)
        opt, sched = build_optimizer(model, recipe)
        step = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step = int(state["step"])
            eng.restore_rng(state, step)
            if ctx.is_main:  # even with --quiet: where a run continues is never a guess
                console.print(f"resuming from step {step} to step {total} ({out})", soft_wrap=True)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_temporaries(out)
            checkpoint.atomic_write(out / "config.yaml",
                                    lambda tmp: tmp.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False)))
            _truncate_history(out, step)
        run = _Run(eng, model, opt, sched, td, recipe, out, total)
        return run.loop(step, quiet or not ctx.is_main)


def _truncate_history(out: Path, step: int) -> None:
    """Drop logged rows past the checkpoint a run resumes from (they will be logged again)."""
    path = out / HISTORY
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


class _Run:
    """One run's state; `loop` is the training loop (the step is its own, everything else the engine's)."""

    def __init__(self, eng: engine.Engine, model, opt, sched, td: TrainingData, recipe: Recipe, out: Path,
                 total: int):
        self.eng, self.model, self.opt, self.sched = eng, model, opt, sched
        self.td, self.recipe, self.out, self.total = td, recipe, out, total
        self.net = self._wrap()
        self.scale = recipe.features.top_db ** 2 if recipe.data.kind == "speech" else 1.0
        self.saved_at = -1
        calibration = recipe.train.calibration_steps
        self.calibration_start = total - calibration if calibration > 0 else None
        self.calibrating = False

    def _wrap(self):
        """The module the step calls: the model, or under several processes its DistributedDataParallel
        wrapper (built from the parameters that require gradients now)."""
        if self.eng.ctx.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        dev = self.eng.dev
        return DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def phase(self, step: int) -> str:
        """"train" or "calibration" (the last train.calibration_steps steps): a pure function of the step."""
        start = self.calibration_start
        return "calibration" if start is not None and step >= start else "train"

    def _enter_calibration(self) -> None:
        """Freeze the encoder and quantizer (requires_grad off, so Adam skips them and DDP expects no gradient
        for them) and, under DDP, wrap the model again: DDP fixes the parameters it reduces when it is built."""
        for module in self.model.frozen_in_calibration():
            for p in module.parameters():
                p.requires_grad_(False)
        self.net = self._wrap()
        self.calibrating = True

    def save(self, step: int) -> None:
        """All ranks call this (their RNG streams are gathered); rank 0 writes."""
        rngs = self.eng.rng_states()
        if self.eng.ctx.is_main and step != self.saved_at:
            td = self.td
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "step": step, **rngs, "recipe": to_dict(self.recipe),
                     "features": to_dict(td.features) if td.features else None, "speakers": td.speakers}
            checkpoint.save_step(state, self.out, step, self.recipe.train.keep_last)
        self.saved_at = step

    def train_step(self, step: int, batch: dict[str, torch.Tensor], scaler) -> tuple[torch.Tensor, dict]:
        """One optimisation step; returns the loss and the statistics (device tensors, no host sync)."""
        cfg, eng = self.recipe.train, self.eng
        tau = temperature(self.recipe.quantizer.temperature, step)
        calibrate = self.phase(step) == "calibration"
        if calibrate and not self.calibrating:
            self._enter_calibration()
        with eng.autocast(cfg.amp), eng.noise(step):
            result = self.net(batch, temperature=tau, calibrate=calibrate)
        loss = result.loss
        self.opt.zero_grad(set_to_none=True)
        scaler.scale(loss * self._share(step, batch)).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        scaler.step(self.opt)
        scaler.update()
        return loss, {"loss": loss, **result.losses, **result.stats}

    def _share(self, step: int, batch: dict[str, torch.Tensor]) -> float:
        """W * (this rank's items) / (global batch): DDP's gradient average then weighs every item alike when
        the slices differ in size (a bucket that does not split evenly); 1 for even slices."""
        local = next(iter(batch.values())).shape[0]
        return self.eng.ctx.world * local / self.td.batches.global_size(step)

    def loop(self, step: int, quiet: bool) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        cfg, eng, ctx = self.recipe.train, self.eng, self.eng.ctx
        scaler = torch.amp.GradScaler(eng.dev.type, enabled=cfg.amp == "fp16" and eng.dev.type == "cuda")
        last: dict[str, Any] = {}

        def step_fn(s: int, batch):
            loss, values = self.train_step(s, batch, scaler)
            self._schedule(s + 1)
            return loss, values

        def on_log(s: int, row: dict[str, float]) -> str:
            nonlocal last
            last = self._log(writer, s, row)
            return _describe(last)

        self.net.train()
        writer = SummaryWriter(str(self.out / "tensorboard")) if ctx.is_main else None
        try:
            step, signal = eng.loop(self.td.batches, step, self.total, workers=self.recipe.data.num_workers,
                                    step=step_fn, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                                    on_log=on_log, save=self.save, out=self.out, label="train", quiet=quiet)
        finally:
            if writer is not None:
                writer.close()
        if signal is not None:
            if ctx.is_main:
                console.print(f"interrupted: saved checkpoint at step {step} in {self.out}; continue with --resume",
                              soft_wrap=True)
        elif ctx.is_main:
            _finish(self.out, last, quiet)
        return {**last, "step": step, "interrupted": signal}

    def _schedule(self, step: int) -> None:
        """Multistep/constant: every step. Plateau: at each epoch's end, on the validation loss."""
        if self.recipe.train.lr_schedule != "plateau":
            self.sched.step()
        elif step % self.td.batches.steps_per_epoch == 0:
            self.sched.step(validation_loss(self.model, self.td.validation, self.recipe, self.eng))

    def _log(self, writer, step: int, row: dict[str, float]) -> dict[str, Any]:
        row = {**row, "tau": temperature(self.recipe.quantizer.temperature, step - 1),
               "lr": self.opt.param_groups[0]["lr"]}
        if "mse" in row and self.scale != 1.0:
            row["mel_mse_db2"] = row["mse"] * self.scale
        last = {"step": step, **row}
        if writer is not None:
            _log(writer, self.out, last)
        return last


@torch.no_grad()
def validation_loss(model: SQVAE, dataset, recipe: Recipe, eng: engine.Engine) -> float:
    """Mean loss over the validation set with deterministic quantization (model.eval()), the value the
    reference steps ReduceLROnPlateau with. Each rank scores its slice of every batch; the mean is global."""
    if dataset is None:
        raise UserError("train.lr_schedule=plateau needs a validation set (image datasets have one)")
    from sqaudio.data.batches import collate_images

    ctx, size = eng.ctx, recipe.data.batch_size
    total = torch.zeros(2, dtype=torch.float64, device=eng.dev)
    model.eval()
    try:
        for first in range(0, len(dataset) - ctx.world + 1, size):
            rows = range(first + ctx.rank, min(first + size, len(dataset)), ctx.world)
            batch = {k: v.to(eng.dev) for k, v in collate_images([dataset[i] for i in rows]).items()}
            with eng.autocast(recipe.train.amp):
                loss = model(batch).loss.double()
            total += torch.stack([loss * len(rows), loss.new_tensor(float(len(rows)))])
    finally:
        model.train()
    total = distributed.sum_all(total)
    return float(total[0] / total[1])


def _describe(row: dict[str, float]) -> str:
    keys = ["loss", "mel_mse_db2", "mse", "perplexity", "entropy", "var_q", "tau"]
    return " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


def _log(writer, out: Path, row: dict[str, Any]) -> None:
    for key, value in row.items():
        if key != "step":
            writer.add_scalar(f"train/{key}", value, row["step"])
    with open(out / HISTORY, "a") as f:
        f.write(json.dumps(row) + "\n")


def _finish(out: Path, last: dict[str, Any], quiet: bool) -> None:
    """Plots, then the summary on stdout (progress and notes go to stderr): final statistics and every output."""
    plot = plot_annealing(out)
    if quiet or not last:
        return
    table = Table(title=f"training finished: {out}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in last.items():
        table.add_row(key, f"{value:.5g}" if isinstance(value, float) else str(value))
    stdout = Console()
    stdout.print(table)
    outputs = [("checkpoint", checkpoint.latest(out)), ("config", out / "config.yaml"), ("history", out / HISTORY),
               ("TensorBoard logs", out / "tensorboard"), ("self-annealing plot", plot)]
    for what, path in outputs:
        if path is not None:
            stdout.print(f"wrote {what}: {path}", highlight=False, soft_wrap=True)
