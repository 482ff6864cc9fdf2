"""One trainer for speech and images: recipe + data -> run directory with checkpoints, logs and plots."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sqaudio import checkpoint, distributed
from sqaudio.config import FeatureConfig, Recipe, TemperatureConfig, from_dict, to_dict
from sqaudio.data import StepBatches, image_batches, speech_batches
from sqaudio.device import pick_device  # noqa: F401  (re-exported for the commands)
from sqaudio.errors import UserError
from sqaudio.plots import plot_annealing
from sqaudio.sqvae import SQVAE, build_model
from sqaudio.store import open_store

console = Console(stderr=True)
HISTORY = "history.jsonl"


def temperature(cfg: TemperatureConfig, step: int) -> float:
    """Gumbel-softmax temperature at a step: max(min, init * exp(-decay * step))."""
    return max(cfg.min, cfg.init * math.exp(-cfg.decay * step))


def feature_mismatch(expected: FeatureConfig, found: FeatureConfig) -> list[str]:
    """Names and values of feature settings that differ."""
    a, b = to_dict(expected), to_dict(found)
    return [f"{k}: recipe {a[k]!r} vs data {b[k]!r}" for k in a if a[k] != b[k]]


@dataclasses.dataclass
class TrainingData:
    batches: StepBatches
    speakers: list[str]
    features: FeatureConfig | None


def load_training_data(recipe: Recipe, data: str | Path, rank: int = 0, world: int = 1) -> TrainingData:
    """Training batches for a recipe; speech recipes also fix the speaker table and check the features."""
    if recipe.data.kind == "speech":
        store = open_store(data)
        diff = feature_mismatch(recipe.features, store.features)
        if diff:
            raise UserError(f"recipe features do not match the prepared data in {data}: {'; '.join(diff)}")
        batches = speech_batches(store, recipe.data, store.speakers, recipe.train.seed, rank, world)
        return TrainingData(batches, store.speakers, store.features)
    from sqaudio.images import build_image_datasets

    train_set, _ = build_image_datasets(recipe.data, data or recipe.data.root)
    return TrainingData(image_batches(train_set, recipe.data, recipe.train.seed, rank, world), [], None)


def build_optimizer(model: torch.nn.Module, recipe: Recipe):
    cfg = recipe.train
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.lr_schedule == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
    elif cfg.lr_schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.gamma, patience=3)
    elif cfg.lr_schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise UserError(f"unknown train.lr_schedule '{cfg.lr_schedule}' (valid: multistep, plateau, constant)")
    return opt, sched


def checkpoint_state(model, opt, sched, step: int, recipe: Recipe, data: TrainingData) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, "rng": torch.get_rng_state(), "recipe": to_dict(recipe),
            "features": to_dict(data.features) if data.features else None, "speakers": data.speakers}


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[SQVAE, dict[str, Any]]:
    """Rebuild a model from a checkpoint (or the newest one of a run dir) with its own saved recipe."""
    state = checkpoint.load(checkpoint.latest(Path(path)))
    recipe = from_dict(Recipe, state["recipe"])
    model = build_model(recipe)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def train(recipe: Recipe, data: str | Path, out: str | Path, resume: bool = False,
          device: str | None = None, quiet: bool = False) -> dict[str, float]:
    """Train `recipe` on `data` into run directory `out`; returns the final logged statistics.

    Under torchrun (WORLD_SIZE > 1) each process takes its slice of every global batch and the model is
    wrapped in DistributedDataParallel; only rank 0 writes checkpoints, logs and progress.
    """
    out = Path(out)
    dev = pick_device(device)
    ctx = distributed.init_from_env(dev)
    if dev.type == "cuda" and ctx.world > 1:
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
    if recipe.data.batch_size % ctx.world:
        raise UserError(f"data.batch_size {recipe.data.batch_size} is not divisible by {ctx.world} processes")
    existing = checkpoint.list_checkpoints(out) if out.is_dir() else []
    if existing and not resume:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue or choose a new --out")
    torch.manual_seed(recipe.train.seed)
    td = load_training_data(recipe, data, ctx.rank, ctx.world)
    if recipe.model.kind == "speech" and recipe.model.speech.n_speakers == 0:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(
            recipe.model, speech=dataclasses.replace(recipe.model.speech, n_speakers=len(td.speakers))))
    cfg = recipe.train
    total = cfg.epochs * td.batches.steps_per_epoch if cfg.epochs > 0 else cfg.steps
    model = build_model(recipe).to(dev)
    opt, sched = build_optimizer(model, recipe)
    step = 0
    if existing:
        state = checkpoint.load(existing[-1])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(out)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        _truncate_history(out, step)
    net = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    try:
        return _loop(net, model, opt, sched, td, recipe, out, dev, step, total, quiet or not ctx.is_main, ctx)
    finally:
        distributed.shutdown()


def _truncate_history(out: Path, step: int) -> None:
    """Drop logged rows past the checkpoint a run resumes from (they will be logged again)."""
    path = out / HISTORY
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _loop(net, model, opt, sched, td: TrainingData, recipe: Recipe, out: Path, dev, step: int, total: int,
          quiet: bool, ctx: distributed.Context) -> dict[str, float]:
    from torch.utils.tensorboard import SummaryWriter

    cfg = recipe.train
    scale = recipe.features.top_db ** 2 if recipe.data.kind == "speech" else 1.0
    writer = SummaryWriter(str(out / "tensorboard")) if ctx.is_main else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp == "fp16" and dev.type == "cuda")
    running: dict[str, float] = {}
    epoch_loss, last = [], {}
    save = lambda: ctx.is_main and checkpoint.save_step(  # noqa: E731
        checkpoint_state(model, opt, sched, step, recipe, td), out, step, cfg.keep_last)
    net.train()
    progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, disable=quiet)
    stopped = False
    try:
        with distributed.StopSignals() as stop, progress:
            task = progress.add_task("train", total=total, completed=step, info="")
            while step < total:
                batch = {k: v.to(dev, non_blocking=True) for k, v in td.batches[step].items()}
                tau = temperature(recipe.quantizer.temperature, step)
                with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    result = net(batch, temperature=tau)
                loss = result.loss
                flags = distributed.sum_all(torch.tensor([float(not torch.isfinite(loss)), float(stop.signal is not None)],
                                                         device=dev))
                if flags[0] > 0:
                    good = checkpoint.list_checkpoints(out)
                    raise UserError(f"loss is {loss.item()} at step {step}; stopped without saving "
                                    f"(last good checkpoint: {good[-1] if good else 'none'})")
                if flags[1] > 0:
                    stopped = True
                    break
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                step += 1
                epoch_loss.append(loss.item())
                if cfg.lr_schedule == "plateau":
                    if step % td.batches.steps_per_epoch == 0:
                        sched.step(sum(epoch_loss) / len(epoch_loss))
                        epoch_loss = []
                else:
                    sched.step()
                row = _stats_row(result, loss, tau, scale, opt)
                running = {k: running.get(k, v) * 0.9 + v * 0.1 for k, v in row.items()}
                if (step % cfg.log_every == 0 or step == total) and ctx.is_main:
                    last = {"step": step, **running}
                    _log(writer, out, last)
                progress.update(task, completed=step, info=_describe(running))
                if step % cfg.checkpoint_every == 0 or step == total:
                    save()
    finally:  # (a second Ctrl-C/SIGTERM is not caught: it ends the process at once)
        if writer is not None:
            writer.close()
    if stopped:
        save()
        if ctx.is_main:
            console.print(f"interrupted: saved checkpoint at step {step} in {out}; continue with --resume")
        return last
    if ctx.is_main:
        _finish(out, last, quiet)
    distributed.barrier()
    return last


def _stats_row(result, loss, tau: float, scale: float, opt) -> dict[str, float]:
    row = {"loss": loss.item(), "tau": tau, "lr": opt.param_groups[0]["lr"]}
    row.update({k: float(v.detach()) for k, v in result.losses.items()})
    row.update({k: float(v) for k, v in result.stats.items()})
    if "mse" in row and scale != 1.0:
        row["mel_mse_db2"] = row["mse"] * scale
    return row


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
    plot_annealing(out)
    if quiet or not last:
        return
    table = Table(title=f"training finished: {out}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in last.items():
        table.add_row(key, f"{value:.5g}" if isinstance(value, float) else str(value))
    console.print(table)
