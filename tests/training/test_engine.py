"""The training engine: keyed noise, interruption at a step boundary, resume rules, validation, plateau."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import signal_when

from sqaudio import checkpoint
from sqaudio.models import noise

TINY = ["--set", "train.checkpoint_every=1000", "--set", "train.log_every=1", "--quiet", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


# ------------------------------------------------------------------ noise keyed by (seed, step, global sample)

def test_keyed_noise_matches_across_world_sizes_and_differs_across_ranks():
    from sqaudio.models.quantizers import gumbel_softmax
    from sqaudio.models.speech import Jitter

    logits = torch.randn(6, 5, 7)
    with noise.keyed(3, 11, 0, 1):
        whole = gumbel_softmax(logits, 0.5)
    parts = []
    for rank in range(2):
        with noise.keyed(3, 11, rank, 2):
            parts.append(gumbel_softmax(logits[rank::2], 0.5))
    assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])
    with noise.keyed(3, 11, 0, 2):  # the same rows drawn again on rank 0: the same noise
        assert torch.equal(gumbel_softmax(logits[0::2], 0.5), parts[0])
    with noise.keyed(3, 11, 1, 2):  # rank 1 given rank 0's rows: its own noise, not rank 0's
        assert not torch.equal(gumbel_softmax(logits[0::2], 0.5), parts[0])
    with noise.keyed(3, 12, 0, 1):  # another step: other noise
        assert not torch.equal(gumbel_softmax(logits, 0.5), whole)
    z = torch.arange(40.0).reshape(4, 1, 10)
    jitter = Jitter(0.5).train()
    with noise.keyed(3, 11, 0, 1):
        full = jitter(z)
    with noise.keyed(3, 11, 1, 2):
        assert torch.equal(jitter(z[1::2]), full[1::2])
    assert not torch.equal(full, z)  # it does move latents


def test_keyed_uniform_is_uniform():
    with noise.keyed(0, 0):
        u = noise.uniform((200, 500), torch.device("cpu"))
        v = noise.uniform((200, 500), torch.device("cpu"))  # the next draw of the same step
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1])) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.01


# ------------------------------------------------------------------ interruption and resume

def _cmd(store, out, steps, *extra):
    return [sys.executable, "-m", "sqaudio", "train", "demo/tiny", "--data", str(store), "--out", str(out),
            "--set", f"train.steps={steps}", *TINY, *extra]


def _interrupt(cmd, out, signum=signal.SIGINT, after_rows=2):
    """Start a run, signal it once it has logged `after_rows` steps; returns (exit code, stderr)."""
    history = out / "history.jsonl"
    return signal_when(cmd, lambda: history.exists() and len(history.read_text().splitlines()) >= after_rows,
                       signum, ENV)


@pytest.mark.parametrize("quantizer", ["gaussian", "vq_ema"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_store, tmp_path, quantizer):
    """Ctrl-C is taken at a step boundary before the forward pass (no noise drawn, no codebook or BatchNorm
    update), so the saved state is exactly the state after the last finished step."""
    extra = ["--set", f"quantizer.kind={quantizer}"]
    steps = 24
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert subprocess.run(_cmd(tiny_store, straight, steps, *extra), env=ENV, timeout=300).returncode == 0
    code, err = _interrupt(_cmd(tiny_store, split, steps, *extra), split)
    assert code == 128 + signal.SIGINT, err
    stopped = checkpoint.load(checkpoint.latest(split))["step"]
    assert 2 <= stopped < steps
    done = subprocess.run(_cmd(tiny_store, split, steps, *extra, "--resume"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"from step {stopped}" in done.stderr and f"to step {steps}" in done.stderr
    a, b = (checkpoint.load(checkpoint.latest(r))["model"] for r in (straight, split))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_keeps_the_saved_config_and_set_changes_only_what_it_names(cli, tiny_store, tmp_path):
    out = tmp_path / "run"
    args = ["train", "demo/tiny", "--data", tiny_store, "--out", out, "--device", "cpu", "--quiet"]
    assert cli(*args, "--set", "train.steps=3", "--set", "train.log_every=1", "--set", "train.lr=0.002").exit_code == 0
    result = cli(*args, "--resume")  # no --set: the saved 3 steps, not the recipe's
    assert result.exit_code == 0 and checkpoint.load(checkpoint.latest(out))["step"] == 3
    assert "from step 3" in result.output and "to step 3" in result.output
    result = cli(*args, "--resume", "--set", "train.steps=5")
    assert result.exit_code == 0, result.output
    assert "from step 3" in result.output and "to step 5" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 5 and saved["train"]["log_every"] == 1 and saved["train"]["lr"] == 0.002
    assert checkpoint.load(checkpoint.latest(out))["recipe"]["train"]["lr"] == 0.002
    result = cli("train", "mnist/sqvae_gauss1", "--data", tiny_store, "--out", out, "--resume", "--device", "cpu")
    assert result.exit_code == 2 and "demo/tiny" in result.output


# ------------------------------------------------------------------ validation before anything is written

@pytest.mark.parametrize("setting,key", [
    ("data.batch_size=0", "data.batch_size"), ("train.log_every=0", "train.log_every"),
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.amp=bfloat16", "train.amp"),
    ("train.steps=0", "train.steps"), ("train.lr=-1", "train.lr"), ("train.gamma=0", "train.gamma"),
    ("train.lr_schedule=cosine", "train.lr_schedule"), ("train.keep_last=-1", "train.keep_last"),
    ("train.grad_clip=-1", "train.grad_clip"), ("train.epochs=-2", "train.epochs"),
    ("train.milestones=[-5]", "train.milestones"), ("data.num_workers=-1", "data.num_workers"),
    ("data.mode=whole", "data.mode"), ("data.sample_frames=2", "data.sample_frames"),
    ("data.kind=audio", "data.kind"), ("quantizer.variant=5", "quantizer.variant"),
    ("quantizer.temperature.init=0", "quantizer.temperature.init"),
    ("quantizer.temperature.decay=-1", "quantizer.temperature.decay"),
    ("quantizer.vq_decay=1.5", "quantizer.vq_decay"), ("model.speech.jitter=2", "model.speech.jitter"),
    ("model.kind=text", "model.kind")])
def test_bad_settings_are_one_line_errors_before_anything_is_written(cli, tiny_store, tmp_path, setting, key):
    out = tmp_path / "run"
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", out, "--set", setting, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_utterance_max_frames_too_small_is_refused(cli, tiny_store, tmp_path):
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", tmp_path / "run", "--set", "data.mode=utterance",
                 "--set", "data.max_frames=3")
    assert result.exit_code == 2 and "data.max_frames" in result.output and not (tmp_path / "run").exists()


def test_amp_names_its_choices(cli, tiny_store, tmp_path):
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", tmp_path / "run", "--set", "train.amp=bfloat16")
    assert result.exit_code == 2 and "none, bf16, fp16" in result.output


def test_full_size_speech_recipes_use_bf16_on_cuda_and_fp32_on_cpu():
    from sqaudio.config import load_recipe
    from sqaudio.distributed import Context
    from sqaudio.training.engine import Process

    for name in ("vctk/sqvae_gauss4", "vctk/sqvae_gauss1", "zerospeech2019/sqvae_gauss4", "vctk/vqvae_ema"):
        assert load_recipe(name).train.amp == "bf16", name
    with Process(torch.device("cpu"), Context()).autocast("bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # CPU: full precision


# ------------------------------------------------------------------ plateau on the validation loss

def test_plateau_schedule_steps_on_the_deterministic_validation_loss(cli, tmp_path):
    """One epoch (12 images, batch 4): the scheduler's best value is the validation loss of the model at the
    epoch's end with deterministic quantization, recomputed here independently, not the training loss."""
    import json

    from factories import mnist_arrays, write_idx_tree

    from sqaudio.data.images import build_image_datasets
    from sqaudio.models.sqvae import load_model

    root = tmp_path / "data"
    write_idx_tree(root / "MNIST" / "raw", mnist_arrays())
    out = tmp_path / "run"
    result = cli("train", "mnist/sqvae_gauss1", "--data", root, "--out", out, "--device", "cpu", "--quiet",
                 "--set", "train.epochs=1", "--set", "data.batch_size=4", "--set", "model.vision.channels=8",
                 "--set", "train.log_every=3", "--set", "train.lr_schedule=plateau")
    assert result.exit_code == 0, result.output
    model, state = load_model(out)
    assert state["step"] >= 1  # one epoch: the plateau step at its end is the last thing training did
    _, val = build_image_datasets(model.recipe.data, root)
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(val), 4):
            items = [val[i] for i in range(first, min(first + 4, len(val)))]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            total += float(model(batch).loss) * len(items)
            count += len(items)
    best = state["scheduler"]["best"]
    assert best == pytest.approx(total / count, rel=1e-5)
    train_loss = json.loads((out / "history.jsonl").read_text().splitlines()[-1])["loss"]
    assert abs(best - train_loss) > 1e-3 * abs(train_loss)
