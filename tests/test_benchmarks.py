"""Benchmarks: the comparison's branched runs, the GPU check's CPU smoke mode, the comparison's packed stores."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from sqaudio import checkpoint
from sqaudio.data.store import open_store

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK_PARTS = ["install", "preflight", "inputs", "train_bf16", "train_fp32", "vq", "utterance", "vocoder",
                   "exactness", "reconstruct", "ddp"]


def _benchmark(name: str = "vctk_mini_comparison"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check(out: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """benchmarks/gpu_check.sh in its CPU smoke mode with this interpreter; its exit and its JSON."""
    env = {**os.environ, "GPU_CHECK_CPU": "1", "PYTHON": sys.executable, **env}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done, json.loads((out / "gpu_check.json").read_text())


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


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    done, doc = _gpu_check(tmp_path / "out", timeout=2400)
    assert done.returncode == 0, done.stdout[-4000:]
    assert list(doc["parts"]) == GPU_CHECK_PARTS
    assert {p["status"] for p in doc["parts"].values()} <= {"ok", "skipped"}, doc["failed"]
    assert doc["finished"] and doc["failed"] == [] and doc["mode"] == "cpu"
    train = doc["parts"]["train_bf16"]["result"]
    assert train["loader_steps_per_s"] > 0 and train["cuda_syncs_per_step"] == "skipped: cpu"
    assert doc["parts"]["utterance"]["result"]["mode"] == "utterance"
    assert doc["parts"]["vq"]["result"]["recipe"] == "vctk/vqvae_ema"
    assert doc["parts"]["vocoder"]["result"]["steps_per_s"] > 0
    exact = doc["parts"]["exactness"]["result"]
    assert exact["rerun"]["bit_exact"] and exact["resume"]["bit_exact"]  # one CPU thread: bit for bit
    assert {row["vocoder"] for row in doc["parts"]["reconstruct"]["result"]} == {"hifigan", "griffin-lim"}
    assert set(doc["parts"]["ddp"]["result"]["steps_per_s"]) == {"1", "2"}
    log = (tmp_path / "out" / "log.txt").read_text()
    assert all(f"[ok] {part} (" in log for part in GPU_CHECK_PARTS)  # each part printed as it finished


def test_a_failed_part_fails_the_gpu_check_and_the_others_are_still_recorded(tmp_path):
    done, doc = _gpu_check(tmp_path / "out", timeout=600, GPU_CHECK_PARTS="install vq",
                           GPU_CHECK_VQ_RECIPE="vctk/no_such_recipe")
    assert done.returncode == 1
    assert list(doc["parts"]) == ["install", "vq"] and doc["finished"]
    assert doc["parts"]["install"]["status"] == "ok"
    assert doc["parts"]["vq"]["status"] == "failed" and "no_such_recipe" in doc["parts"]["vq"]["error"][-1]
    assert doc["failed"] == ["vq"]


def test_a_packed_store_unpacks_to_float32_features_within_float16_rounding(tiny_store, tmp_path):
    stores = _benchmark("gpu_stores")
    stores.pack(tiny_store, tmp_path / "store.zip")
    original = open_store(tiny_store)
    assert stores.unpack(tmp_path / "store.zip", tmp_path / "unpacked") == len(original.entries)
    unpacked = open_store(tmp_path / "unpacked")
    assert unpacked.entries == original.entries and unpacked.speakers == original.speakers
    assert unpacked.features == original.features
    for entry in original.entries:
        a, b = original.load(entry), unpacked.load(entry)
        assert b.dtype == np.float32 and np.array_equal(b, a.astype(np.float16).astype(np.float32))
        assert not np.array_equal(a, b)  # the zip holds float16: halved, rounded
