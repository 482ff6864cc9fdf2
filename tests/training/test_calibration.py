"""Decoder calibration (train.calibration_steps)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from sqaudio import checkpoint
from sqaudio.config import list_recipes, load_recipe

FAST = ["--device", "cpu", "--quiet", "--set", "train.log_every=1", "--set", "train.keep_last=0"]


def _train(cli, store, out, steps, calibration, *overrides, resume=False):
    args = ["train", "demo/tiny", "--data", store, "--out", out, *FAST, "--set", f"train.steps={steps}",
            "--set", f"train.calibration_steps={calibration}", "--set", "train.checkpoint_every=2"]
    for o in overrides:
        args += ["--set", o]
    result = cli(*args, *(["--resume"] if resume else []))
    assert result.exit_code == 0, result.output
    return out


def _state(run, step):
    return checkpoint.load(run / f"checkpoint-{step}.pt")["model"]


def _frozen(key):
    return key.startswith(("encoder.", "quantizer."))


@pytest.mark.parametrize("quantizer", ["gaussian", "vq_ema"])
def test_calibration_moves_only_the_decoder(cli, tiny_store, tmp_path, quantizer):
    """During the last steps the encoder (weights and BatchNorm statistics), the variance channels and scalar
    and the codebook (SQ parameter or VQ EMA buffers) stay put; the decoder keeps training."""
    run = _train(cli, tiny_store, tmp_path / "run", 8, 4, f"quantizer.kind={quantizer}")
    before, after, earlier = _state(run, 4), _state(run, 8), _state(run, 2)
    frozen = [k for k in before if _frozen(k)]
    assert any("running_mean" in k for k in frozen) and any("codebook" in k for k in frozen)
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(earlier[k], before[k]) for k in frozen if "running_mean" in k)  # moved before
    assert any(not torch.equal(earlier[k], before[k]) for k in frozen if "codebook" in k)
    decoder = [k for k in before if k.startswith("decoder.")]
    assert decoder and all(not torch.equal(before[k], after[k]) for k in decoder if before[k].is_floating_point())


def test_calibration_forward_decodes_the_argmax_codes(tiny_store):
    """The phase's output is what evaluation decodes: eval-mode encoder, argmax codes, codebook lookup, no
    jitter; only the decoder gets gradients and the encoder's BatchNorm statistics do not move."""
    from sqaudio.data.batches import speech_batches
    from sqaudio.data.store import open_store
    from sqaudio.models.sqvae import build_model

    recipe = load_recipe("demo/tiny", ["model.speech.n_speakers=2"])
    store = open_store(tiny_store)
    batch = speech_batches(store, recipe.data, store.speakers, 0)[0]
    torch.manual_seed(0)
    model = build_model(recipe).train()
    model(batch, temperature=1.0)  # a training step's forward: BatchNorm statistics move off their init
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    out = model(batch, calibrate=True)
    assert model.training and model.encoder.training and model.quantizer.training  # modes restored
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert set(out.losses) == {"reconstruction"}
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.quantizer.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    model.eval()
    with torch.no_grad():
        codes, _ = model.encode(batch)
        x_hat = model.decode(model.quantizer.lookup(codes), batch["speaker"])
        mse = (x_hat - out.target).square().mean()
    assert torch.equal(codes, out.codes)
    assert torch.allclose(out.x_hat.detach(), x_hat, atol=1e-6, rtol=0)
    assert torch.allclose(out.stats["mse"], mse, rtol=1e-5)
    assert torch.allclose(out.losses["reconstruction"], 0.5 * out.target[0].numel() * mse.log(), rtol=1e-5)


@pytest.mark.parametrize("resume_from", [2, 6])
def test_resume_across_and_inside_the_phase_equals_straight(cli, tiny_store, tmp_path, resume_from):
    """The phase is a function of the step: resuming before the boundary (2 -> 8 crosses it at 4) or inside
    the phase (6) gives the uninterrupted run bit for bit."""
    straight = _train(cli, tiny_store, tmp_path / "straight", 8, 4)
    split = tmp_path / "split"
    shutil.copytree(straight, split)
    for path in checkpoint.list_checkpoints(split):
        if checkpoint.load(path)["step"] > resume_from:
            path.unlink()
    _train(cli, tiny_store, split, 8, 4, resume=True)
    a, b = _state(straight, 8), _state(split, 8)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_paper_recipes_have_the_options_off():
    paper = [n for n in list_recipes() if n.split("/")[0] in ("vctk", "zerospeech2019")
             and n.split("/")[1].startswith(("sqvae_gauss", "vqvae_ema"))]
    assert len(paper) >= 10
    for name in paper + ["fashion_mnist/short_sqvae_gauss1", "vctk/mini_sqvae_gauss4", "vctk/mini_vqvae_ema"]:
        recipe = load_recipe(name)
        assert recipe.train.calibration_steps == 0, name


def test_calibrated_recipes_share_budgets_with_their_baselines():
    for corpus in ("vctk", "zerospeech2019"):
        sq = load_recipe(f"{corpus}/mini_sqvae_gauss4_calibrated")
        for name in ("mini_sqvae_gauss4", "mini_vqvae_ema", "mini_vqvae_ema_decay099", "mini_vqvae_ema_calibrated",
                     "mini_vqvae_ema_decay099_calibrated"):
            other = load_recipe(f"{corpus}/{name}")
            assert other.train.steps == sq.train.steps and other.train.milestones == sq.train.milestones, name
            if name.endswith("_calibrated"):
                assert other.train.calibration_steps == sq.train.calibration_steps > 0
    fm = load_recipe("fashion_mnist/short_sqvae_gauss1_calibrated")
    for name in ("short_vqvae_ema_calibrated", "short_vqvae_ema_decay0999_calibrated"):
        other = load_recipe(f"fashion_mnist/{name}")
        assert other.train.steps == fm.train.steps and other.train.calibration_steps == fm.train.calibration_steps > 0


@pytest.mark.parametrize("settings,key", [
    (["train.calibration_steps=-1"], "train.calibration_steps"),
    (["train.steps=5", "train.calibration_steps=6"], "train.calibration_steps")])
def test_bad_values_are_one_line_errors(cli, tiny_store, tmp_path, settings, key):
    out = tmp_path / "run"
    args = ["train", "demo/tiny", "--data", tiny_store, "--out", out, "--device", "cpu"]
    for s in settings:
        args += ["--set", s]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert key in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_calibration_may_be_the_whole_budget(cli, tiny_store, tmp_path):
    run = _train(cli, tiny_store, tmp_path / "run", 2, 2)
    recipe = load_recipe("demo/tiny", ["model.speech.n_speakers=2"])
    from sqaudio.models.sqvae import build_model

    torch.manual_seed(recipe.train.seed)
    start = build_model(recipe).state_dict()
    after = _state(run, 2)
    assert all(torch.equal(start[k], after[k]) for k in after if _frozen(k))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_gloo_processes_run_the_phase_and_match_one(tiny_store, tmp_path):
    """Under DDP (2 gloo processes) the phase trains without unused-parameter errors, keeps the encoder and
    codebook fixed and follows the one-process trajectory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = [sys.executable, "-m", "sqaudio", "train", "demo/tiny", "--data", str(tiny_store), "--out", str(out),
               "--set", "train.steps=6", "--set", "train.calibration_steps=3", "--set", "train.checkpoint_every=3",
               "--set", "train.keep_last=0", "--set", "quantizer.kind=vq_ema", "--set", "model.speech.jitter=0.0",
               "--quiet", "--device", "cpu"] + (["--devices", "2"] if n > 1 else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[n] = out
    a3, a6, b6 = _state(runs[2], 3), _state(runs[2], 6), _state(runs[1], 6)
    for key in a3:
        if _frozen(key):
            assert torch.equal(a3[key], a6[key]), key
        if a6[key].is_floating_point():
            moved = (a6[key].double() - a3[key].double()).norm()
            assert (a6[key].double() - b6[key].double()).norm() <= 1e-2 * moved + 1e-5, key


@pytest.mark.parametrize("value", [None, 3])
def test_checkpoints_with_the_retired_hard_st_setting(cli, tiny_store, tmp_path, value):
    """Checkpoints of the version that had quantizer.hard_from_step still evaluate; resuming is refused in one
    line only when the run used it (it would train on differently)."""
    from sqaudio.models.sqvae import load_model

    run = _train(cli, tiny_store, tmp_path / "run", 4, 0)
    path = run / "checkpoint-4.pt"
    state = checkpoint.load(path)
    state["recipe"]["quantizer"]["hard_from_step"] = value
    checkpoint.save(state, path)
    model, _ = load_model(run)
    assert model.recipe.quantizer.kind == "gaussian"
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", run, *FAST, "--set", "train.steps=5", "--resume")
    if value is None:
        assert result.exit_code == 0, result.output
        assert (run / "checkpoint-5.pt").is_file()
    else:
        assert result.exit_code == 2 and "quantizer.hard_from_step=3" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (run / "checkpoint-5.pt").exists()
