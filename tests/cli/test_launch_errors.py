"""Multi-process training fails with one line, printed once, exit code 2 and in bounded time: recipe, data and
device errors before any process starts (nothing written), a DataLoader worker's error as its own line, a rank
killed by a signal or stuck in a collective named by the launcher."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_store
from factories import make_store as make_vocoder_store
from typer.testing import CliRunner

from sqaudio.cli import app

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TIMEOUT_S = 300  # the bound on every run: a hang fails the test


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("sq") / "features")


@pytest.fixture(scope="module")
def vocoder_store(tmp_path_factory) -> Path:
    return make_vocoder_store(tmp_path_factory.mktemp("voc") / "features")


def _train_args(store: Path, out: Path, *sets: str) -> list[str]:
    return ["train", "demo/tiny", "--data", str(store), "--out", str(out), "--quiet", "--device", "cpu",
            *[word for item in sets for word in ("--set", item)]]


def _vocoder_args(store: Path, out: Path, *sets: str) -> list[str]:
    return ["vocoder", "train", str(store), "--out", str(out), "--recipe", "tiny", "--quiet", "--device", "cpu",
            *[word for item in sets for word in ("--set", item)]]


def _one_error(code: int, stderr: str) -> str:
    """The run's only error line (exit code 2, one line starting "error:", no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, (code, stderr[-3000:])
    return lines[0]


def _in_process(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    return _one_error(result.exit_code, result.stderr)


def _subprocess(*args: str, env: dict[str, str] = ENV) -> str:
    done = subprocess.run([sys.executable, "-m", "sqaudio", *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    return _one_error(done.returncode, done.stderr)


@pytest.fixture
def no_launch(monkeypatch, tmp_path):
    """Any process the launcher started would fail to start (no such interpreter) and say so: what a test
    expects then shows that its error came before any process started."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))


@pytest.mark.parametrize("setting, expected", [
    ("quantizer.codebook_size=0", "quantizer.codebook_size and quantizer.dim must be >= 1, got 0"),
    ("model.speech.channels=0", "model.speech.channels must be >= 1, got 0"),
    ("features.n_mels=40", "recipe features do not match the prepared data in"),
    ("data.batch_size=7", "data.batch_size 7 is not divisible by 2 processes"),
])
def test_recipe_errors_are_refused_before_any_process_starts(store, tmp_path, no_launch, setting, expected):
    line = _in_process(*_train_args(store, tmp_path / "run", setting), "--devices", "2")
    assert expected in line and "rank" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["quantizer.codebook_size=0", "model.speech.channels=0"])
def test_model_sizes_are_refused_before_anything_is_written_in_one_process(store, tmp_path, setting):
    _in_process(*_train_args(store, tmp_path / "run", setting))
    assert not (tmp_path / "run").exists()


def test_more_processes_than_gpus_are_refused(store, tmp_path, no_launch):
    line = _in_process(*_train_args(store, tmp_path / "run"), "--device", "cuda",
                       "--devices", str(torch.cuda.device_count() + 1))
    assert "not available here" in line or "GPUs (one process each)" in line
    assert not (tmp_path / "run").exists()
    assert "--devices must be >= 1, got 0" in _in_process(*_train_args(store, tmp_path / "run"), "--devices", "0")


def test_a_bad_timeout_is_refused_before_any_process_starts(store, tmp_path, monkeypatch, no_launch):
    monkeypatch.setenv("SQAUDIO_DIST_TIMEOUT_S", "soon")
    line = _in_process(*_train_args(store, tmp_path / "run"), "--devices", "2")
    assert "SQAUDIO_DIST_TIMEOUT_S must be a number of seconds > 0, got 'soon'" in line
    assert not (tmp_path / "run").exists()


def test_vocoder_errors_are_refused_before_any_process_starts(vocoder_store, tmp_path, no_launch):
    """(A batch that does not split: tests/training/test_vocoder_ddp.py.)"""
    line = _in_process(*_vocoder_args(vocoder_store, tmp_path / "run", "train.batch_frames=100000"), "--devices", "2")
    assert "no training utterance in" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_bad_feature_file_is_one_line(tmp_path, devices):
    root = make_store(tmp_path / "features")
    (root / "features/train/spk1/spk1_2.npy").write_bytes(b"not a numpy file")
    line = _in_process(*_train_args(root, tmp_path / "run", "data.num_workers=2", "train.steps=2"),
                       "--devices", str(devices))
    assert "cannot read features" in line and "(entry spk1_2)" in line and "re-run prepare" in line


@pytest.mark.parametrize("devices", [1, 2])
def test_a_data_loader_workers_error_is_its_own_line(tmp_path, devices):
    """The vocoder's DataLoader workers read each crop's features: a worker's UserError comes back as the same
    one line, not torch's wrapped worker traceback. Under two processes the entry is rank 1's item of step 0:
    rank 1 reports it, rank 0 (waiting in a collective) leaves quietly."""
    from sqaudio.codec.vocoders import load_vocoder_config
    from sqaudio.data.store import open_store
    from sqaudio.training.vocoder import crop_batches, usable_entries

    root = make_vocoder_store(tmp_path / "features")
    train = load_vocoder_config("tiny").train
    entries = usable_entries(open_store(root), "train", train.batch_frames)
    bad = entries[crop_batches(open_store(root), entries, train.batch_size, train.batch_frames,
                               train.seed).indices(0)[1]]
    (root / bad["features"]).write_bytes(b"not a numpy file")
    args = (*_vocoder_args(root, tmp_path / "run", "train.num_workers=2", "train.steps=6"), "--devices", str(devices))
    line = _in_process(*args) if devices == 1 else _subprocess(*args)
    assert line.startswith("error: cannot read features" if devices == 1 else "error: rank 1: cannot read features")
    assert f"(entry {bad['id']})" in line and "DataLoader worker" not in line


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's child process with RANK=`rank` (from /proc), None while it has none."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _start_long_run(store: Path, out: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """A two-process run with many steps, once it trains (config.yaml written), and its rank 1's pid."""
    proc = subprocess.Popen([sys.executable, "-m", "sqaudio", *_train_args(store, out, "train.steps=100000"),
                             "--devices", "2"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "config.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    rank1 = _rank_pid(proc.pid, 1)
    assert rank1 is not None and proc.poll() is None, proc.communicate(timeout=TIMEOUT_S)[1][-3000:]
    return proc, rank1


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_is_named_once(store, tmp_path):
    proc, rank1 = _start_long_run(store, tmp_path / "run", ENV)
    os.kill(rank1, signal.SIGKILL)  # what the out-of-memory killer sends
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
    line = _one_error(proc.returncode, stderr)
    assert line == "error: rank 1 was killed by signal 9 (SIGKILL: out of memory?)"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_stuck_collective_ends_at_the_timeout(store, tmp_path):
    """Rank 1 stops (SIGSTOP) mid-run: rank 0's next collective gives up after SQAUDIO_DIST_TIMEOUT_S and says so.
    Rank 1 continues once rank 0 is gone, finds its peer gone and leaves quietly."""
    proc, rank1 = _start_long_run(store, tmp_path / "run", {**ENV, "SQAUDIO_DIST_TIMEOUT_S": "5"})
    rank0 = _rank_pid(proc.pid, 0)
    os.kill(rank1, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while rank0 is not None and _rank_pid(proc.pid, 0) == rank0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.kill(rank1, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
    line = _one_error(proc.returncode, stderr)
    assert "SQAUDIO_DIST_TIMEOUT_S" in line and ("waited more than 5 s" in line or "within 5 s" in line), line
