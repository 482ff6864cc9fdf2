"""benchmarks/vctk_mini_comparison.py: a calibrated run branched from its plain twin equals the straight run."""
import importlib.util
from pathlib import Path

import torch

from sqaudio import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("vctk_mini_comparison", ROOT / "benchmarks" / "vctk_mini_comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_branched_calibrated_run_equals_the_straight_one(tiny_store, tmp_path):
    bench = _benchmark()
    common = (6, ["--device", "cpu"], 600.0, float("inf"))  # 6 steps: the last 1 calibrated (1500 of 10000 scaled)
    plain, branched = bench.run_pair(tiny_store, tmp_path / "plain", tmp_path / "branch", "vctk/mini_sqvae_gauss4",
                                     1, 3, *common)
    straight = bench.run_one(tiny_store, tmp_path / "straight", "vctk/mini_sqvae_gauss4_calibrated", 3, *common)
    a = checkpoint.load(tmp_path / "branch" / "checkpoint-6.pt")["model"]
    b = checkpoint.load(tmp_path / "straight" / "checkpoint-6.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert branched["mel_mse_db2"] == straight["mel_mse_db2"]
    c = checkpoint.load(tmp_path / "plain" / "checkpoint-6.pt")["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the phase did change the decoder
    assert sorted(p.name for p in (tmp_path / "plain").glob("checkpoint-*.pt")) == [f"checkpoint-{s}.pt" for s in range(1, 7)]
