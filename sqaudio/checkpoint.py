"""Checkpoint files: written atomically (`files.atomic_write`), loaded with weights_only=True."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sqaudio.errors import UserError
from sqaudio.files import atomic_write

CKPT_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


def save(state: dict[str, Any], path: Path) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint {path} safely (weights_only=True): {first}") from None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in `run_dir`, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*.pt")
             if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir_or_file: Path) -> Path:
    """A checkpoint file itself, or the newest checkpoint of a run directory."""
    path = Path(run_dir_or_file)
    if path.is_file():
        return path
    found = list_checkpoints(path) if path.is_dir() else []
    if not found:
        raise UserError(f"no checkpoint found at {path} (expected a checkpoint-<step>.pt file or a run directory)")
    return found[-1]


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary files a killed process left behind (they were never renamed into place)."""
    for tmp in Path(run_dir).glob(".checkpoint-*.tmp"):
        tmp.unlink(missing_ok=True)


def save_step(state: dict[str, Any], run_dir: Path, step: int, keep_last: int) -> Path:
    """Write checkpoint-<step>.pt atomically, then delete all but the newest `keep_last`."""
    path = Path(run_dir) / f"checkpoint-{step}.pt"
    save(state, path)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path
