"""Shared test fixtures: a CLI runner and small generated audio."""
from __future__ import annotations

from pathlib import Path

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
