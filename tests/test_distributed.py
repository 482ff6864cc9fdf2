"""Two gloo processes on the CPU train exactly like one process with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from sqaudio import checkpoint

# VQ-EMA and no jitter: the only randomness is the data order, so the two runs are comparable step for step.
ARGS = ["--set", "quantizer.kind=vq_ema", "--set", "model.speech.jitter=0.0", "--set", "train.checkpoint_every=2",
        "--quiet", "--device", "cpu"]


def _run(store, out, nproc, steps, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sqaudio", "train", "demo/tiny", "--data", str(store), "--out", str(out),
           "--set", f"train.steps={steps}", *ARGS, *extra]
    if nproc > 1:
        cmd += ["--devices", str(nproc)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _assert_same(run_a, run_b):
    """Same trajectory: per tensor, the runs differ by a tiny fraction of what training moved it.

    (Adam turns rounding-level gradient differences on near-zero gradients into lr-sized steps, so a
    per-element tolerance would be either loose or flaky; a wrong data split or gradient average moves
    every tensor by a large fraction of its update.)
    """
    from sqaudio.config import load_recipe
    from sqaudio.sqvae import build_model

    a = checkpoint.load(checkpoint.latest(run_a))["model"]
    b = checkpoint.load(checkpoint.latest(run_b))["model"]
    recipe = load_recipe("demo/tiny", ["model.speech.n_speakers=2", "quantizer.kind=vq_ema"])
    torch.manual_seed(recipe.train.seed)
    start = build_model(recipe).state_dict()
    for key, value in a.items():
        if not value.is_floating_point():
            continue
        moved = (value.double() - start[key].double()).norm()
        diff = (value.double() - b[key].double()).norm()
        assert diff <= 1e-2 * moved + 1e-6, (key, float(diff), float(moved))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_match_one_and_resume(tiny_store, tmp_path):
    _run(tiny_store, tmp_path / "one", 1, 4)
    _run(tiny_store, tmp_path / "two", 2, 4)
    _assert_same(tmp_path / "one", tmp_path / "two")
    _run(tiny_store, tmp_path / "two_resumed", 2, 2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "two_resumed")] == ["checkpoint-2.pt"]
    _run(tiny_store, tmp_path / "two_resumed", 2, 4, "--resume")
    _assert_same(tmp_path / "two", tmp_path / "two_resumed")
