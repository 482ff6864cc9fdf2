"""Metrics: mel-MSE in dB^2 (paper Table 3), image MSE (Table 2), code usage, perplexity and bitrate."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sqaudio.data.batches import collate_images, eval_speech_batches
from sqaudio.data.features import mel_mse_db2
from sqaudio.errors import UserError
from sqaudio.evaluation.entries import speech_entries

if TYPE_CHECKING:
    from sqaudio.data.store import Store

console = Console(stderr=True)


class CodeUsage:
    """Counts of code indices over valid latent positions."""

    def __init__(self, size: int):
        self.counts = torch.zeros(size, dtype=torch.float64)

    def add(self, codes: torch.Tensor, mask: torch.Tensor | None) -> None:
        valid = codes[mask] if mask is not None else codes.reshape(-1)
        self.counts += torch.bincount(valid.cpu(), minlength=len(self.counts)).double()

    def summary(self) -> dict[str, float]:
        p = self.counts / self.counts.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        return {"perplexity": math.exp(entropy), "used_codes": int((self.counts > 0).sum()),
                "code_entropy_bits": entropy / math.log(2), "positions": int(self.counts.sum())}


@torch.no_grad()
def evaluate_speech(model, speakers: list[str], store: Store, split: str = "test", eval_list: str | None = None,
                    batch_size: int = 16, quiet: bool = False) -> dict[str, Any]:
    """Mel-MSE in dB^2 of a speech model over a split (or list) of `store`, with code usage and bitrate."""
    device = _device(model)
    features = model.recipe.features
    entries, unknown = speech_entries(store, features, speakers, split, eval_list)
    usage = CodeUsage(model.recipe.quantizer.codebook_size)
    sse, frames = 0.0, 0
    with Progress(console=console, disable=quiet) as progress:
        task = progress.add_task("evaluate", total=len(entries))
        for chunk, batch in eval_speech_batches(store, entries, speakers, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch)
            err = ((out.x_hat.float() - out.target.float()) ** 2 * out.mask).sum().item()
            sse += err
            frames += int(out.mask.sum().item())
            usage.add(out.codes, out.code_mask)
            progress.advance(task, len(chunk))
    codes = usage.summary()
    latent_rate = features.frame_rate / 2
    return {"mel_mse_db2": mel_mse_db2(sse, features.n_mels, frames, features.top_db), **codes,
            "bitrate_bps": math.log2(model.recipe.quantizer.codebook_size) * latent_rate,
            "entropy_bitrate_bps": codes["code_entropy_bits"] * latent_rate,
            "utterances": len(entries), "frames": frames, "skipped_unknown_speakers": unknown}


@torch.no_grad()
def evaluate_images(model, data: str | Path | None, batch_size: int = 100, grid: str | None = None,
                    quiet: bool = False) -> dict[str, Any]:
    """MSE (or, for class maps, accuracy and mean IoU) of an image model over its test set, with code usage."""
    from sqaudio.data.images import build_image_datasets

    device = _device(model)
    recipe = model.recipe
    _, test_set = build_image_datasets(recipe.data, data or recipe.data.root)
    usage = CodeUsage(recipe.quantizer.codebook_size)
    vmf = recipe.model.likelihood == "vmf"
    totals = {"sq_err": 0.0, "correct": 0.0, "pixels": 0.0}
    inter = union = 0
    n, first = 0, None
    with Progress(console=console, disable=quiet) as progress:
        task = progress.add_task("evaluate", total=len(test_set))
        for start in range(0, len(test_set), batch_size):
            items = [test_set[i] for i in range(start, min(start + batch_size, len(test_set)))]
            batch = {k: v.to(device) for k, v in collate_images(items).items()}
            out = model(batch)
            if vmf:
                from sqaudio.models.vmf import iou_counts

                pred = out.x_hat.argmax(dim=1)
                totals["correct"] += (pred == out.target).sum().item()
                i, u = iou_counts(pred, out.target, recipe.model.vision.num_classes)
                inter, union = inter + i, union + u
            else:
                totals["sq_err"] += ((out.x_hat.float() - out.target.float()) ** 2).sum().item()
            totals["pixels"] += out.target.numel()
            usage.add(out.codes, None)
            n += len(items)
            first = first or (batch["x"][:8].cpu(), out.x_hat[:8].cpu())
            progress.advance(task, len(items))
    if vmf:
        from sqaudio.models.vmf import miou_from_counts

        result = {"accuracy": totals["correct"] / totals["pixels"], "miou": float(miou_from_counts(inter, union))}
    else:
        result = {"mse": totals["sq_err"] / totals["pixels"]}
        result["mse_x1e3"] = result["mse"] * 1e3
    if grid and first is not None:
        from sqaudio.plots import save_grid

        save_grid(*first, grid, title=f"{recipe.name}: first {len(first[0])} test images")
    return {**result, **usage.summary(), "images": n}


def evaluate(run, data: Store | str | Path | None, split: str = "test", eval_list: str | None = None,
             grid: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Evaluate a loaded run (`sqaudio.evaluation.runs.TrainedRun`) on a feature store (speech) or an image dataset root
    (images; None: the recipe's)."""
    model = run.model
    if run.speech:
        if data is None:
            raise UserError("speech evaluation needs --data FEATURES_DIR")
        result = evaluate_speech(model, run.speakers, data, split, eval_list, quiet=quiet)
    else:
        result = evaluate_images(model, data, grid=grid, quiet=quiet)
    result.update({"checkpoint": str(run.checkpoint), "step": run.state["step"],
                   "recipe": model.recipe.name, "quantizer": model.recipe.quantizer.kind,
                   "variant": model.recipe.quantizer.variant, "split": split,
                   "list": str(Path(eval_list).absolute()) if eval_list else None})
    return result


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def print_table(rows: dict[str, dict[str, Any]], title: str) -> Table:
    """Side-by-side table: one column per run."""
    keys = ["mel_mse_db2", "mse_x1e3", "accuracy", "miou", "perplexity", "used_codes", "code_entropy_bits",
            "bitrate_bps", "pesq_wb", "stoi", "estoi", "si_sdr_db", "mel_distance_db2", "utterances", "images",
            "frames", "step"]
    table = Table(title=title)
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    for key in keys:
        if any(key in r for r in rows.values()):
            table.add_row(key, *[_fmt(r.get(key)) for r in rows.values()])
    Console().print(table)
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
