"""One trainer for speech and images: recipe + data -> run directory with checkpoints, logs and plots."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from sqaudio import distributed
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
from sqaudio.training.run import Run, RunResult, Schedule, Trainer


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
    """Adam over the model (fused on GPUs) and the recipe's learning-rate scheduler."""
    cfg = recipe.train
    cuda = next(model.parameters()).is_cuda
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, **({"fused": True} if cuda else {}))  # one kernel
    if cfg.lr_schedule == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
    elif cfg.lr_schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.gamma, patience=3)
    elif cfg.lr_schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    else:
        raise UserError(f"unknown train.lr_schedule '{cfg.lr_schedule}' (valid: multistep, plateau, constant)")
    return optimizer, scheduler


def resumed_recipe(state: dict[str, Any], recipe: Recipe, overrides: list[str]) -> Recipe:
    """The saved configuration of the run being resumed, with only the `--set` overrides changed."""
    saved = state["recipe"]
    if recipe.name != saved.get("name"):
        raise UserError(f"this run was trained with recipe '{saved.get('name')}', not '{recipe.name}': resume "
                        f"with the same recipe (its saved config is used; change settings with --set)")
    return saved_recipe(saved, resuming=True, overrides=overrides)


def check_recipe(recipe: Recipe, world: int) -> None:
    """The recipe's values and its global batch split over `world` processes (UserError)."""
    validate_recipe(recipe)
    engine.check_divisible(recipe.data.batch_size, world, "data.batch_size")


def check_launch(recipe: Recipe, data: str | Path | None, world: int, device: str | None, resume: bool) -> None:
    """What a run on `world` local processes can be refused for, checked once before any starts (nothing is
    written): the device count; for a new run also the recipe, the batch split, the store's features and
    speakers and the model's sizes (built on the meta device: no memory). Resuming, the saved recipe is the
    processes' to check (still before anything is written); here only the data is opened."""
    distributed.check_world(device, world)
    if resume:
        if recipe.data.kind == "speech":
            open_store(data)
        return
    check_recipe(recipe, world)
    speakers = load_training_data(recipe, data, 0, world).speakers if recipe.data.kind == "speech" else []
    with torch.device("meta"):
        build_model(_with_speakers(recipe, speakers))


def train(recipe: Recipe, data: str | Path, out: str | Path, resume: bool = False,
          device: str | None = None, quiet: bool = False, overrides: list[str] | None = None) -> RunResult:
    """Train `recipe` on `data` (a prepared store, or an image dataset root) into run directory `out`.

    `resume` continues the newest checkpoint with its saved configuration, with `overrides` (the `--set`
    items) changing only what they name; with `overrides=None` (a caller that built `recipe` itself) the
    given recipe is used instead. Under torchrun (WORLD_SIZE > 1) each process takes its slice of every
    global batch (DistributedDataParallel); only rank 0 writes checkpoints, logs and progress. Every check
    runs on every rank before anything is written, and a failure is reported once (`engine.together`).
    """
    with engine.session(device, recipe.train.deterministic) as process:
        ctx = process.ctx
        run = Run(process, out, resume)
        with engine.together(ctx):
            if run.state is not None and overrides is not None:
                recipe = resumed_recipe(run.state, recipe, overrides)
            check_recipe(recipe, ctx.world)
            process.seed_streams(recipe.train.seed)
            training_data = load_training_data(recipe, data, ctx.rank, ctx.world)
            recipe = _with_speakers(recipe, training_data.speakers)
            cfg = recipe.train
            total = cfg.epochs * training_data.batches.steps_per_epoch if cfg.epochs > 0 else cfg.steps
            model = run.initial(lambda: build_model(recipe), cfg.seed).to(process.dev)
            optimizer, scheduler = build_optimizer(model, recipe)
            run.restore({"model": model, "optimizer": optimizer, "scheduler": scheduler}, total)
        features = to_dict(training_data.features) if training_data.features else None
        run.set_up(yaml.safe_dump(to_dict(recipe), sort_keys=False),
                   {"recipe": to_dict(recipe), "features": features, "speakers": training_data.speakers})
        trainer = SQVAETrainer(process, model, optimizer, scheduler, training_data, recipe, total)
        schedule = Schedule(total, cfg.log_every, cfg.checkpoint_every, cfg.keep_last, recipe.data.num_workers)
        result = run.train(trainer, training_data.batches, schedule, quiet)
        if result.signal is None and ctx.is_main:
            _finish(result, quiet)
    return result


def _with_speakers(recipe: Recipe, speakers: list[str]) -> Recipe:
    """A speech recipe with model.speech.n_speakers = 0 takes the size of the data's speaker table."""
    if recipe.model.kind != "speech" or recipe.model.speech.n_speakers != 0:
        return recipe
    speech = dataclasses.replace(recipe.model.speech, n_speakers=len(speakers))
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, speech=speech))


class SQVAETrainer(Trainer):
    """The SQ-VAE step on a `Run`: autocast, keyed noise, backward, clipping, Adam, the LR schedule and the
    decoder-calibration phase; logs the temperature, learning rate and mel-MSE in dB^2.

    Args:
        process: this process (`engine.session`); model, optimizer, scheduler: as built for the recipe;
        data: the training data; recipe: the run's recipe; total: the step the run ends at.
    """

    progress_keys = ("loss", "mel_mse_db2", "mse", "perplexity", "entropy", "var_q", "tau")

    def __init__(self, process: engine.Process, model: SQVAE, optimizer, scheduler, data: TrainingData,
                 recipe: Recipe, total: int):
        self.process, self.model, self.optimizer, self.scheduler = process, model, optimizer, scheduler
        self.data, self.recipe = data, recipe
        self.scale = recipe.features.top_db ** 2 if recipe.data.kind == "speech" else 1.0
        calibration = recipe.train.calibration_steps
        self.calibration_start = total - calibration if calibration > 0 else None
        self.calibrating = False
        dev = process.dev
        self.scaler = torch.amp.GradScaler(dev.type, enabled=recipe.train.amp == "fp16" and dev.type == "cuda")
        self.net = self._wrap()
        self.net.train()

    def _wrap(self):
        """The module the step calls: the model, or under several processes its DistributedDataParallel
        wrapper (built from the parameters that require gradients now)."""
        if self.process.ctx.world == 1:
            return self.model
        return distributed.wrap_ddp(self.model, self.process.dev)

    def phase(self, step: int) -> str:
        """"train" or "calibration" (the last train.calibration_steps steps): a pure function of the step."""
        start = self.calibration_start
        return "calibration" if start is not None and step >= start else "train"

    def _enter_calibration(self) -> None:
        """Freeze the encoder and quantizer (requires_grad off, so Adam skips them and DDP expects no gradient
        for them) and, under DDP, wrap the model again: DDP fixes the parameters it reduces when it is built."""
        for module in self.model.frozen_in_calibration():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.net = self._wrap()
        self.calibrating = True

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step and the LR schedule; returns the loss and the statistics (device tensors)."""
        cfg, process = self.recipe.train, self.process
        tau = temperature(self.recipe.quantizer.temperature, step)
        calibrate = self.phase(step) == "calibration"
        if calibrate and not self.calibrating:
            self._enter_calibration()
        with process.autocast(cfg.amp), process.noise(step):
            result = self.net(batch, temperature=tau, calibrate=calibrate)
        loss = result.loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * self._share(step, batch)).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._schedule(step + 1)
        return loss, {"loss": loss, **result.losses, **result.stats}

    def _share(self, step: int, batch: dict[str, torch.Tensor]) -> float:
        """W * (this rank's items) / (global batch): DDP's gradient average then weighs every item alike when
        the slices differ in size (a bucket that does not split evenly); 1 for even slices."""
        local = next(iter(batch.values())).shape[0]
        return self.process.ctx.world * local / self.data.batches.global_size(step)

    def _schedule(self, step: int) -> None:
        """Multistep/constant: every step. Plateau: at each epoch's end, on the validation loss."""
        if self.recipe.train.lr_schedule != "plateau":
            self.scheduler.step()
        elif step % self.data.batches.steps_per_epoch == 0:
            self.scheduler.step(validation_loss(self.model, self.data.validation, self.recipe, self.process))

    def log(self, step: int, averages: dict[str, float]) -> dict[str, float]:
        row = {**averages, "tau": temperature(self.recipe.quantizer.temperature, step - 1),
               "lr": self.optimizer.param_groups[0]["lr"]}
        if "mse" in row and self.scale != 1.0:
            row["mel_mse_db2"] = row["mse"] * self.scale
        return row


@torch.no_grad()
def validation_loss(model: SQVAE, dataset, recipe: Recipe, process: engine.Process) -> float:
    """Mean loss over the validation set with deterministic quantization (model.eval()), the value the
    reference steps ReduceLROnPlateau with. Each rank scores its slice of every batch; the mean is global."""
    if dataset is None:
        raise UserError("train.lr_schedule=plateau needs a validation set (image datasets have one)")
    from sqaudio.data.batches import collate_images

    ctx, size = process.ctx, recipe.data.batch_size
    total = torch.zeros(2, dtype=torch.float64, device=process.dev)
    model.eval()
    try:
        for first in range(0, len(dataset) - ctx.world + 1, size):
            rows = range(first + ctx.rank, min(first + size, len(dataset)), ctx.world)
            batch = engine.to_device(collate_images([dataset[i] for i in rows]), process.dev)
            with process.autocast(recipe.train.amp):
                loss = model(batch).loss.double()
            total += torch.stack([loss * len(rows), loss.new_tensor(float(len(rows)))])
    finally:
        model.train()
    total = distributed.sum_all(total)
    return float(total[0] / total[1])


def _finish(result: RunResult, quiet: bool) -> None:
    """Plots, then the summary on stdout (progress and notes go to stderr): final statistics and every output."""
    plot = plot_annealing(result.config.parent)
    if quiet or not result.statistics:
        return
    table = Table(title=f"training finished: {result.config.parent}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in {"step": result.step, **result.statistics}.items():
        table.add_row(key, f"{value:.5g}" if isinstance(value, float) else str(value))
    stdout = Console()
    stdout.print(table)
    outputs = [("checkpoint", result.checkpoint), ("config", result.config), ("history", result.history),
               ("TensorBoard logs", result.logs), ("self-annealing plot", plot)]
    for what, path in outputs:
        if path is not None:
            stdout.print(f"wrote {what}: {path}", highlight=False, soft_wrap=True)
