"""Shared test fixtures: a CLI runner and small generated audio."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sqaudio.cli import app

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(1)


@pytest.fixture
def cli():
    """Invoke the CLI in-process: cli("prepare", "in", "out") -> click Result (exit_code, output)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def harmonic(seconds: float = 1.0, rate: int = 16000, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A speech-like harmonic signal with vibrato and a little noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t) ** 2) + 0.01 * rng.standard_normal(t.size)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def make_store(root: Path, n_speakers: int = 2, n_utts: int = 4, seconds: float = 0.8, test_per_speaker: int = 1) -> Path:
    """Write a small prepared-feature store (the `prepare` output format) from generated harmonic audio."""
    import json

    from sqaudio.config import FeatureConfig
    from sqaudio.data.features import log_mel_spectrogram
    from sqaudio.data.store import feature_config_json

    cfg = FeatureConfig()
    root.mkdir(parents=True, exist_ok=True)
    lines, speakers = [], [f"spk{s}" for s in range(n_speakers)]
    for s, spk in enumerate(speakers):
        for u in range(n_utts):
            wav = harmonic(seconds + 0.1 * u, f0=110 + 40 * s + 7 * u, seed=10 * s + u)
            mel = log_mel_spectrogram(wav, cfg)
            split = "test" if u < test_per_speaker else "train"
            rel = f"features/{split}/{spk}/{spk}_{u}.npy"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / rel, mel)
            lines.append({"id": f"{spk}_{u}", "speaker": spk, "split": split, "source": f"/gen/{spk}/{spk}_{u}.wav",
                          "features": rel, "frames": int(mel.shape[1]), "duration_s": len(wav) / cfg.sample_rate})
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "feature_config.json").write_text(feature_config_json(cfg))
    (root / "speakers.json").write_text(json.dumps(speakers))
    return root


@pytest.fixture
def tiny_store(tmp_path) -> Path:
    return make_store(tmp_path / "features")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A run directory of the demo/tiny speech SQ-VAE trained 4 steps on `make_store` data (shared, read-only)."""
    root = tmp_path_factory.mktemp("tiny_model")
    store = make_store(root / "features")
    result = CliRunner().invoke(app, ["train", "demo/tiny", "--data", str(store), "--out", str(root / "run"),
                                      "--set", "train.steps=4", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "run"


def signal_when(cmd: list[str], ready: Callable[[], bool], signum: int, env: dict[str, str],
                wait_s: float = 120) -> tuple[int, str]:
    """Start `cmd`, send it `signum` as soon as `ready()` holds (or when `wait_s` has passed; a process that
    already ended gets nothing), and return its exit code and stderr."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + wait_s
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=wait_s)
    return proc.returncode, err
