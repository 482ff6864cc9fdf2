"""A checkpoint write that fails halfway leaves the previous file intact and no partial file behind."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from sqaudio import checkpoint


class DiskFull(OSError):
    pass


def failing_save(obj, f, *args, **kwargs) -> None:
    """What torch.save does when the disk fills up: some bytes reach the file, then an error."""
    with open(f, "wb") as handle:
        handle.write(b"PK\x03\x04 half a checkpoint")
    raise DiskFull(errno.ENOSPC, "No space left on device")


def state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((4, 4), float(step))}}


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_overwrite_keeps_the_old_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-2.pt"
    checkpoint.save(state(2), path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFull):
        checkpoint.save(state(3), path)
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["checkpoint-2.pt"]
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 2


def test_failed_save_step_keeps_older_checkpoints_and_adds_no_file(tmp_path, monkeypatch):
    for step in (1, 2):
        checkpoint.save_step(state(step), tmp_path, step, keep_last=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFull):
        checkpoint.save_step(state(3), tmp_path, 3, keep_last=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 2


def test_successful_save_replaces_the_file_in_one_piece(tmp_path):
    path = tmp_path / "checkpoint-5.pt"
    checkpoint.save(state(4), path)
    checkpoint.save(state(5), path)
    assert files_in(tmp_path) == ["checkpoint-5.pt"]
    loaded = checkpoint.load(path)
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["w"], torch.full((4, 4), 5.0))


def test_training_run_that_fails_writing_a_checkpoint_keeps_the_last_one(cli, tmp_path, monkeypatch):
    from conftest import make_store

    store, run = make_store(tmp_path / "features"), tmp_path / "run"
    args = ["train", "demo/tiny", "--data", store, "--out", run, "--set", "train.checkpoint_every=2", "--quiet",
            "--device", "cpu"]
    assert cli(*args, "--set", "train.steps=2").exit_code == 0
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    assert list(before) == ["checkpoint-2.pt"]
    monkeypatch.setattr(torch, "save", failing_save)
    result = cli(*args, "--set", "train.steps=4", "--resume")
    monkeypatch.undo()
    assert result.exit_code == 2 and "No space left on device" in result.output  # a one-line error
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint-")]
    assert checkpoint.load(checkpoint.latest(run))["step"] == 2
