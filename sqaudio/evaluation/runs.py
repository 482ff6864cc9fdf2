"""Trained runs as evaluation sees them: each loaded once (model and checkpoint state), named, and the files in
its directory where results are kept."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sqaudio import checkpoint
from sqaudio.errors import UserError
from sqaudio.files import atomic_write
from sqaudio.models.sqvae import SQVAE, load_model


@dataclass
class TrainedRun:
    """A run loaded once: where it is, the checkpoint read, the model (eval mode, on its device) and the
    checkpoint's state (step, recipe, feature config, speaker table).

    Args:
        name: how tables and pages call it (`run_names`).
        path: the run directory or checkpoint file as given.
    """

    name: str
    path: Path
    checkpoint: Path
    model: SQVAE
    state: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def speech(self) -> bool:
        return self.model.recipe.data.kind == "speech"

    @property
    def speakers(self) -> list[str]:
        return self.state.get("speakers", [])


def load_run(path: str | Path, device: torch.device | str = "cpu", name: str | None = None) -> TrainedRun:
    """The newest checkpoint of a run directory (or a checkpoint file), read once."""
    path = Path(path)
    found = checkpoint.latest(path)
    model, state = load_model(found, device)
    return TrainedRun(name or path.name, path, found, model, state)


def load_runs(paths: list[Path], device: torch.device | str = "cpu") -> list[TrainedRun]:
    """Several runs, named by `run_names` (a run given twice is refused before any is read)."""
    return [load_run(path, device, name) for path, name in zip(paths, run_names(paths))]


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


def result_path(run_dir: Path, split: str, eval_list: str | Path | None = None) -> Path:
    """Where a run keeps the result of what was evaluated: eval-<split>.json or eval-list-<list stem>.json
    (a UserError when that file holds the result of another list with the same name)."""
    if not eval_list:
        return Path(run_dir) / f"eval-{split}.json"
    return named_result_path(run_dir, "list", eval_list, "list", "list")


def named_result_path(run_dir: Path, kind: str, source: str | Path, key: str, what: str) -> Path:
    """eval-<kind>-<source stem>.json in the run dir: the result of an evaluation named by the file `source`; a
    UserError when it holds the result of another `what` of that name (its absolute path is the result's `key`)."""
    path = Path(run_dir) / f"eval-{kind}-{Path(source).stem}.json"
    old = json.loads(path.read_text()).get(key) if path.is_file() else None
    if old and old != str(Path(source).absolute()):
        raise UserError(f"{path} holds the result of another {what} ({old}); rename {Path(source).name}")
    return path


def save_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """Keep `result` in the run dir under its `result_path`, replacing an older result of the same evaluation."""
    path = result_path(run_dir, result.get("split", "test"), result.get("list"))
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return path
