"""Metrics: mel-MSE in dB^2 (paper Table 3), image MSE (Table 2), code usage, perplexity and bitrate."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sqaudio import checkpoint
from sqaudio.config import feature_mismatch
from sqaudio.data.batches import collate_images, eval_speech_batches
from sqaudio.data.features import mel_mse_db2
from sqaudio.data.store import open_store
from sqaudio.distributed import pick_device
from sqaudio.errors import UserError
from sqaudio.models.sqvae import load_model

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


def read_eval_list(path: str | Path) -> list[tuple[str, str]]:
    """Evaluation list of the reference code: [[path_without_ext, speaker], ...]."""
    try:
        items = json.loads(Path(path).read_text())
        return [(str(p), str(s)) for p, s in items]
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot read evaluation list {path}: expected [[path, speaker], ...] ({err})") from None


def select_entries(entries: list[dict], eval_list: list[tuple[str, str]]) -> list[dict]:
    """Manifest entries whose source (without extension) ends with a listed path."""
    by_stem = {str(Path(e["source"]).with_suffix("")).replace("\\", "/"): e for e in entries}
    chosen = []
    for path, _speaker in eval_list:
        match = [e for stem, e in by_stem.items() if stem.endswith(path.strip("/"))]
        if not match:
            raise UserError(f"evaluation list entry '{path}' is not in the prepared data")
        chosen.append(match[0])
    return chosen


def speech_entries(store, features, speakers: list[str], split: str = "test",
                   eval_list: str | None = None) -> tuple[list[dict], list[str]]:
    """The utterances a model is evaluated on (split or list, known speakers, >= 8 frames) and the unknown
    speakers left out; a UserError when the model's features differ from the store's or nothing is left."""
    diff = feature_mismatch(features, store.features)
    if diff:
        raise UserError(f"model features do not match the prepared data in {store.root}: {'; '.join(diff)}")
    entries = select_entries(store.entries, read_eval_list(eval_list)) if eval_list else store.split(split)
    known = set(speakers)
    unknown = sorted({e["speaker"] for e in entries} - known)
    entries = [e for e in entries if e["speaker"] in known and e["frames"] >= 8]
    if not entries:
        raise UserError(f"no utterances to evaluate in split '{split}' of {store.root} with a speaker the model knows")
    return entries, unknown


@torch.no_grad()
def evaluate_speech(model, state: dict, data: str | Path, split: str = "test", eval_list: str | None = None,
                    device: torch.device | str = "cpu", batch_size: int = 16, quiet: bool = False) -> dict[str, Any]:
    store = open_store(data)
    features = model.recipe.features
    speakers = state["speakers"]
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
def evaluate_images(model, data: str | Path, device="cpu", batch_size: int = 100, grid: str | None = None,
                    quiet: bool = False) -> dict[str, Any]:
    from sqaudio.data.images import build_image_datasets

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


def evaluate(model_path: str | Path, data: str | Path | None, split: str = "test", eval_list: str | None = None,
             device: str | None = None, grid: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run dir's newest) on prepared speech or an image test set."""
    dev = pick_device(device)
    model, state = load_model(model_path, dev)
    if model.recipe.data.kind == "speech":
        if data is None:
            raise UserError("speech evaluation needs --data FEATURES_DIR")
        result = evaluate_speech(model, state, data, split, eval_list, dev, quiet=quiet)
    else:
        result = evaluate_images(model, data, dev, grid=grid, quiet=quiet)
    result.update({"checkpoint": str(checkpoint.latest(Path(model_path))), "step": state["step"],
                   "recipe": model.recipe.name, "quantizer": model.recipe.quantizer.kind,
                   "variant": model.recipe.quantizer.variant, "split": split,
                   "list": str(Path(eval_list).absolute()) if eval_list else None})
    return result


def result_path(run_dir: Path, split: str, eval_list: str | Path | None = None) -> Path:
    """Where a run keeps the result of what was evaluated: eval-<split>.json or eval-list-<list stem>.json
    (a UserError when that file holds the result of another list with the same name)."""
    if not eval_list:
        return Path(run_dir) / f"eval-{split}.json"
    path = Path(run_dir) / f"eval-list-{Path(eval_list).stem}.json"
    old = json.loads(path.read_text()).get("list") if path.is_file() else None
    if old and old != str(Path(eval_list).absolute()):
        raise UserError(f"{path} holds the result of another list ({old}); rename {Path(eval_list).name}")
    return path


def save_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """Keep `result` in the run dir under its `result_path`, replacing an older result of the same evaluation."""
    path = result_path(run_dir, result.get("split", "test"), result.get("list"))
    path.write_text(json.dumps(result, indent=2))
    return path


def run_names(paths: list[Path]) -> list[str]:
    """Shortest distinct path suffix of each run (runs/a/x, runs/b/x -> a/x, b/x); the same run twice is an error."""
    parts = [Path(p).absolute().parts for p in paths]
    if len(set(parts)) < len(parts):
        twice = next(p for p in paths if parts.count(Path(p).absolute().parts) > 1)
        raise UserError(f"run {twice} is given twice")
    names = []
    for i, mine in enumerate(parts):
        others = parts[:i] + parts[i + 1:]
        k = 1
        while k < len(mine) and any(other[-k:] == mine[-k:] for other in others):
            k += 1
        names.append("/".join(mine[-k:]))
    return names


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
