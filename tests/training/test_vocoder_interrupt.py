"""The vocoder trainer on the engine: Ctrl-C at a step boundary, and the interrupted-and-resumed run equals
the uninterrupted one (HiFi-GAN, and Parallel WaveGAN whose generator draws noise from the saved RNG)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import signal_when
from factories import TINY, TINY_PWG, make_store

from sqaudio import checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore:stft with return_complex=False"),
              pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
STEPS = 14


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"))


def _cmd(store, out, overrides, *extra):
    over = [*overrides, f"train.steps={STEPS}", "train.checkpoint_every=3", "train.keep_last=0",
            "train.eval_utterances=0"]
    return [sys.executable, "-m", "sqaudio", "vocoder", "train", str(store), "--out", str(out), "--quiet",
            "--device", "cpu", *extra, *[a for o in over for a in ("--set", o)]]


@pytest.mark.parametrize("overrides", [TINY, TINY_PWG], ids=["hifigan", "parallel_wavegan"])
def test_interrupted_and_resumed_vocoder_equals_uninterrupted(store, tmp_path, overrides):
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = subprocess.run(_cmd(store, straight, overrides, "--recipe", "tiny"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    code, err = signal_when(_cmd(store, split, overrides, "--recipe", "tiny"), (split / "checkpoint-3.pt").exists,
                            signal.SIGINT, ENV)
    assert code == 128 + signal.SIGINT, err
    stopped = checkpoint.load(checkpoint.latest(split))["step"]
    assert 3 <= stopped < STEPS
    done = subprocess.run(_cmd(store, split, [], "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from step {stopped} to step {STEPS}" in " ".join(done.stderr.split())
    a, b = checkpoint.load(straight / f"checkpoint-{STEPS}.pt"), checkpoint.load(split / f"checkpoint-{STEPS}.pt")
    for part in ("generator", "discriminator", "generator_optimizer"):
        flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), (part, key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f"{prefix}/{i}").items()}
    return {}
