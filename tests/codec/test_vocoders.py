"""Vocoders: parallel-wavegan shim, training + exact resume, reload, pretrained dirs, conversion, Griffin-Lim."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import harmonic
from factories import TINY, TINY_PWG, make_store

from sqaudio import checkpoint
from sqaudio.codec.mel_conventions import MelConvention, convert_logmel
from sqaudio.codec.vocoders import (
    GriffinLimVocoder,
    VocoderConfig,
    load_vocoder,
    load_vocoder_config,
)
from sqaudio.config import VOCODER_DIR, FeatureConfig, from_saved, list_recipes, to_dict
from sqaudio.data.features import log_mel_spectrogram
from sqaudio.data.store import open_store
from sqaudio.errors import UserError

pytestmark = [pytest.mark.filterwarnings("ignore:stft with return_complex=False"),  # parallel-wavegan quirks
              pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")]
FEATURES = FeatureConfig()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> Path:
    from sqaudio.training.vocoder import train_vocoder
    out = tmp_path_factory.mktemp("voc")
    train_vocoder(open_store(store), out, load_vocoder_config("tiny", TINY), quiet=True)
    return out


def test_kaiser_shim_and_pqmf_reconstruct():
    import scipy.signal
    import scipy.signal.windows

    from sqaudio.codec.parallel_wavegan import PQMF, Generator
    assert scipy.signal.kaiser is scipy.signal.windows.kaiser
    pqmf = PQMF(subbands=4)
    x = torch.from_numpy(harmonic(0.5))[None, None]
    y = pqmf.synthesis(pqmf.analysis(x))
    core = slice(200, -200)  # PQMF is near-perfect reconstruction away from the edges
    err = (y[..., core] - x[..., core]).norm() / x[..., core].norm()
    assert err < 0.05
    multiband = Generator("MelGANGenerator", {"out_channels": 4, "channels": 48, "upsample_scales": [5, 4, 2],
                                              "stacks": 1}, 80, 160)
    wav, bands = multiband(torch.rand(2, 80, 7), return_subbands=True)
    with pytest.raises(UserError, match="assert channels >= np.prod"):
        Generator("MelGANGenerator", {"channels": 32, "upsample_scales": [5, 4, 4, 2]}, 80, 160)
    assert wav.shape == (2, 7 * 160) and bands.shape == (2, 4, 7 * 40)


@pytest.mark.parametrize("overrides", [TINY, TINY_PWG], ids=["hifigan", "parallel_wavegan"])
def test_train_resume_equals_straight_run(store, tmp_path, cli, overrides):
    from sqaudio.training.vocoder import train_vocoder
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = train_vocoder(open_store(store), straight, load_vocoder_config("tiny", overrides), quiet=True)
    assert result.step == 4 and result.signal is None and "eval/mel_loss" in result.evaluation
    assert result.checkpoint == straight / "checkpoint-4.pt" and set(result.statistics) >= {"generator", "mel"}
    assert cli("vocoder", "train", store, "--out", split, "--recipe", "tiny", "--quiet",
               *[a for o in overrides + ["train.steps=2"] for a in ("--set", o)]).exit_code == 0
    assert [p.name for p in checkpoint.list_checkpoints(split)] == ["checkpoint-2.pt"]
    assert cli("vocoder", "train", store, "--out", split, "--resume", "--quiet", "--set", "train.steps=4").exit_code == 0
    a, b = checkpoint.load(straight / "checkpoint-4.pt"), checkpoint.load(split / "checkpoint-4.pt")
    assert b["step"] == 4 and b["config"]["train"]["steps"] == 4
    for part in ("generator", "discriminator"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert yaml.safe_load((split / "config.yaml").read_text())["features"] == to_dict(FEATURES)
    assert list((split / "logs").glob("events.out.tfevents.*"))


def test_resume_on_a_store_with_other_features_names_them(trained, store, tmp_path):
    import shutil

    from sqaudio.training.vocoder import train_vocoder
    other, run = tmp_path / "other", tmp_path / "run"
    shutil.copytree(store, other)
    shutil.copytree(trained, run)
    config = json.loads((other / "feature_config.json").read_text())
    (other / "feature_config.json").write_text(json.dumps({**config, "fmin": 80.0}))
    with pytest.raises(UserError, match=r"other features than the run in .*: fmin: store 80.0 vs run 50.0$"):
        train_vocoder(open_store(other), run, None, ["train.steps=5"], resume=True, quiet=True)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["checkpoint-4.pt"]


def test_saved_vocoder_reloads_to_identical_output(trained, store):
    from sqaudio.codec.vocoders import build_generator
    mel = torch.from_numpy(np.load(store / "features" / "u3.npy"))[None]
    first = load_vocoder(trained).synthesize(mel)
    again = load_vocoder(trained / "checkpoint-4.pt").synthesize(mel)
    assert first.shape == (1, mel.shape[-1] * FEATURES.hop_length)
    assert torch.equal(first, again)
    state = checkpoint.load(trained / "checkpoint-4.pt")
    generator = build_generator(from_saved(VocoderConfig, state["config"]), FEATURES)
    generator.load_state_dict(state["generator"])  # still with weight norm, as in training
    with torch.no_grad():
        torch.testing.assert_close(generator.eval()(mel), first, rtol=1e-4, atol=1e-5)


def test_train_refuses_existing_run_and_bad_recipes(store, trained, tmp_path, cli):
    result = cli("vocoder", "train", store, "--out", trained, "--recipe", "tiny")
    assert result.exit_code == 2 and "--resume" in result.output
    result = cli("vocoder", "train", store, "--out", tmp_path / "x", "--recipe", "nope")
    assert result.exit_code == 2 and "tiny" in result.output
    result = cli("vocoder", "train", store, "--out", tmp_path / "y", "--recipe", "tiny",
                 "--set", "generator_params.upsample_scales=[5, 4, 4, 4]",
                 "--set", "generator_params.upsample_kernel_sizes=[10, 8, 8, 8]")
    assert result.exit_code == 2 and "hop_length 160" in result.output
    result = cli("vocoder", "train", store, "--out", tmp_path / "z", "--recipe", "tiny", "--set", "generator_params.colour=1")
    assert result.exit_code == 2 and "colour" in result.output
    assert not (tmp_path / "z").exists()
    result = cli("vocoder", "info", trained)
    assert result.exit_code == 0 and "HiFiGANGenerator" in result.output


@pytest.mark.parametrize("name", list_recipes(VOCODER_DIR))
def test_shipped_recipes_build(name):
    from sqaudio.codec.parallel_wavegan import build_discriminator
    from sqaudio.codec.vocoders import build_generator, validate_vocoder_config
    cfg = load_vocoder_config(name)
    generator = build_generator(cfg, FEATURES)
    validate_vocoder_config(cfg, FEATURES)
    with torch.no_grad():
        wav = generator(torch.rand(1, FEATURES.n_mels, 9))
    assert wav.shape == (1, 9 * FEATURES.hop_length)
    if name in ("tiny", "parallel_wavegan", "multiband_melgan"):  # small discriminators: check they take the output
        assert build_discriminator(cfg.discriminator_type, cfg.discriminator_params)(wav[:, None]) is not None


def write_pwg_dir(root: Path, rate: int, hop: int, scales: list[int], fmin, fmax, win: int) -> torch.nn.Module:
    """A parallel-wavegan model directory written with the package's own classes and file layout."""
    from sqaudio.codec.parallel_wavegan import pwg_models
    params = {"in_channels": 80, "out_channels": 1, "channels": 16, "upsample_scales": scales,
              "upsample_kernel_sizes": [2 * s for s in scales], "resblock_kernel_sizes": [3],
              "resblock_dilations": [[1]]}
    generator = pwg_models.HiFiGANGenerator(**params)
    root.mkdir()
    config = {"sampling_rate": rate, "fft_size": 2048, "hop_size": hop, "win_length": win, "window": "hann",
              "num_mels": 80, "fmin": fmin, "fmax": fmax, "generator_type": "HiFiGANGenerator",
              "generator_params": params, "version": "0.6.1"}
    (root / "config.yml").write_text(yaml.safe_dump(config))
    torch.save({"model": {"generator": generator.state_dict()}, "steps": 100}, root / "checkpoint-100steps.pkl")
    rng = np.random.default_rng(0)
    np.save(root / "stats.npy", np.stack([rng.normal(-2.0, 0.5, 80), rng.uniform(0.5, 1.5, 80)]).astype(np.float32))
    return generator


def test_pretrained_pwg_dir_mismatch_names_each_setting(tmp_path):
    write_pwg_dir(tmp_path / "vctk24k", 24000, 300, [5, 5, 4, 3], 80, 7600, 1200)
    vocoder = load_vocoder(tmp_path / "vctk24k")
    with pytest.raises(UserError) as err:
        vocoder.check_compatible(FEATURES)
    message = str(err.value)
    for setting in ("sample_rate: features 16000 vs vocoder 24000", "hop_length: features 160 vs vocoder 300",
                    "win_length", "fmin: features 50 vs vocoder 80", "fmax: features 8000 vs vocoder 7600",
                    "log scale", "pre-emphasis: features 0.97 vs vocoder none", "layout"):
        assert setting in message
    assert "n_mels" not in message and "n_fft" not in message


def test_pretrained_checkpoint_needing_unpickling_is_refused(tmp_path):
    import argparse
    write_pwg_dir(tmp_path / "pwg", 16000, 160, [5, 4, 4, 2], 50, None, 400)
    ckpt = tmp_path / "pwg" / "checkpoint-100steps.pkl"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=1.0)}, ckpt)  # an object that needs code to rebuild
    with pytest.raises(UserError, match="weights_only"):
        load_vocoder(tmp_path / "pwg")


def test_pretrained_pwg_dir_on_our_grid_converts_exactly(tmp_path):
    """Our features without pre-emphasis -> the package's own log10 mel + z-score: same output as its inference."""
    generator = write_pwg_dir(tmp_path / "ours16k", 16000, 160, [5, 4, 4, 2], 50, None, 400)
    cfg = replace(FEATURES, preemphasis=0.0)
    vocoder = load_vocoder(tmp_path / "ours16k", features=cfg)
    x = harmonic(0.5)
    x = x / np.abs(x).max() * cfg.peak
    mel = torch.from_numpy(log_mel_spectrogram(x, cfg))[None]
    ours = vocoder.synthesize(mel)[0]
    from sqaudio.codec.parallel_wavegan import pwg_losses
    reference_mel = pwg_losses.mel_loss.MelSpectrogram(fs=16000, fft_size=2048, hop_size=160, win_length=400,
                                                       num_mels=80, fmin=50, fmax=None)(torch.from_numpy(x)[None])
    generator.register_stats(str(tmp_path / "ours16k" / "stats.npy"))
    generator.remove_weight_norm()
    with torch.no_grad():
        reference = generator.eval().inference(reference_mel[0].T, normalize_before=True)[:, 0]  # (frames, mels) in
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4)


def test_preemphasis_conversion_is_close(tmp_path):
    """The per-band pre-emphasis tilt approximates features computed without it (mean error well under 1 dB)."""
    cfg0 = replace(FEATURES, preemphasis=0.0)
    x = harmonic(2.0)
    with_pre = torch.from_numpy(log_mel_spectrogram(x, FEATURES))[None]
    without = torch.from_numpy(log_mel_spectrogram(x, cfg0))[None]
    converted = convert_logmel(with_pre, MelConvention.of(FEATURES), MelConvention.of(cfg0))
    err_db = (converted - without).abs() * FEATURES.top_db
    assert err_db.mean() < 0.6  # measured 0.34 dB (worst band, the lowest: 2.8 dB)
    assert (with_pre - without).abs().mean() * FEATURES.top_db > 5 * err_db.mean()  # the tilt itself is large


def test_vocoder_not_found_and_wrong_checkpoint(tmp_path):
    with pytest.raises(UserError, match="griffin-lim"):
        load_vocoder(tmp_path / "missing")
    checkpoint.save({"format": "sqvae", "step": 1}, tmp_path / "run" / "checkpoint-1.pt")
    with pytest.raises(UserError, match="not a vocoder checkpoint"):
        load_vocoder(tmp_path / "run")


def spectral_convergence(ref: np.ndarray, est: np.ndarray) -> float:
    """||S - g S_hat||_F / ||S||_F on magnitude STFTs (n_fft 2048, win 400, hop 160); g: least-squares gain
    (the vocoder output is peak-normalised, so its level is defined only up to that)."""
    window = torch.hann_window(400)

    def mag(x):
        return torch.stft(torch.as_tensor(x), 2048, 160, 400, window, return_complex=True).abs()
    s, s_hat = mag(ref), mag(est)
    s_hat = s_hat * (s * s_hat).sum() / (s_hat * s_hat).sum()
    return float(torch.linalg.norm(s - s_hat) / torch.linalg.norm(s))


def test_griffin_lim_round_trip():
    x = harmonic(2.0)
    x = x / np.abs(x).max() * FEATURES.peak
    mel = torch.from_numpy(log_mel_spectrogram(x, FEATURES))[None]
    vocoder = load_vocoder("griffin-lim", features=FEATURES)
    assert isinstance(vocoder, GriffinLimVocoder)
    y = vocoder.synthesize(mel)
    assert y.shape == (1, mel.shape[-1] * FEATURES.hop_length)
    assert float(y.abs().max()) == pytest.approx(FEATURES.peak, rel=1e-5)
    sc = spectral_convergence(x, y[0, : x.size].numpy())
    assert sc < 0.15  # measured 0.098 with 32 iterations
    noise = np.random.default_rng(1).standard_normal(x.size).astype(np.float32)
    assert spectral_convergence(x, noise) > 0.9  # the measure can fail


def test_sigterm_after_a_logged_step_saves_a_checkpoint_and_exits(store, tmp_path):
    import os
    import signal
    import sys

    from conftest import signal_when
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "sqaudio", "vocoder", "train", str(store), "--out", str(out), "--recipe", "tiny",
           "--quiet", *[a for o in ("train.steps=1000000", "train.checkpoint_every=1000000", "train.log_every=1",
                                    "train.eval_utterances=0") for a in ("--set", o)]]
    code, err = signal_when(cmd, (out / "history.jsonl").exists, signal.SIGTERM, env)  # step 1 was logged
    assert code == 128 + signal.SIGTERM, err
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 1 and checkpoint.load(saved[0])["step"] >= 1
    assert "saved checkpoint" in err and not list(out.glob(".*.tmp"))
