"""`sqaudio evaluate` against independent formulas: the mel-MSE in dB^2 over the valid frames of test utterances of
different lengths (each decoded alone), code perplexity, entropy and bitrates from numpy counts of the codes, and
the image MSE from numpy over the decoded test images."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import harmonic
from factories import mnist_arrays, spread_codes, write_idx_tree

from sqaudio.models.sqvae import load_model

RATE = 16000
TEST_SECONDS = {"V001_0101": 0.50, "V001_0102": 0.93, "S002_0101": 0.71, "S002_0102": 1.24}


def _wav(path: Path, seconds: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, harmonic(seconds, RATE, f0=95 + 13 * seed, seed=seed), RATE)


def held_out_mels(store: Path) -> list[tuple[dict, np.ndarray]]:
    """(manifest entry, log-mel cut to an even frame count as the encoder takes it) of every test utterance."""
    entries = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines() if line.strip()]
    mels = [(e, np.load(store / e["features"]).astype(np.float32)) for e in entries if e["split"] == "test"]
    return [(e, mel[:, : mel.shape[1] - mel.shape[1] % 2]) for e, mel in mels]


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory) -> tuple[Path, Path]:
    """(store, checkpoint): a ZeroSpeech-layout corpus whose test utterances all differ in length, prepared; the
    demo/tiny model trained 2 steps on it, then made to spread its codes (`spread_codes`)."""
    from typer.testing import CliRunner

    from sqaudio.cli import app

    root = tmp_path_factory.mktemp("metric_formulas")
    lang = root / "corpus" / "english"
    for i, name in enumerate(["V001_0001", "V001_0002", "V001_0003", "S002_0001", "S002_0002", "S002_0003"]):
        _wav(lang / "train" / "voice" / f"{name}.wav", 0.6 + 0.1 * i, seed=i)
    for i, (name, seconds) in enumerate(TEST_SECONDS.items()):
        _wav(lang / "test" / f"{name}.wav", seconds, seed=20 + i)
    runner = CliRunner()
    for args in (["prepare", root / "corpus", root / "store", "--workers", "1", "--quiet"],
                 ["train", "demo/tiny", "--data", root / "store", "--out", root / "run", "--set", "train.steps=2",
                  "--quiet", "--device", "cpu"]):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    model, _ = load_model(root / "run", "cpu")
    spread_codes(model, [mel for _, mel in held_out_mels(root / "store")])
    state = torch.load(root / "run" / "checkpoint-2.pt", weights_only=True)
    (root / "spread").mkdir()
    torch.save({**state, "model": model.state_dict()}, root / "spread" / "checkpoint-2.pt")
    return root / "store", root / "spread" / "checkpoint-2.pt"


def evaluated(cli, run: Path, data: Path, out: Path) -> dict:
    result = cli("evaluate", run, "--data", data, "--json", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def code_statistics(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Usage statistics of code indices, from numpy counts."""
    counts = np.bincount(codes.ravel(), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    nats = float(-(p * np.log(p)).sum())
    return {"perplexity": math.exp(nats), "code_entropy_bits": nats / math.log(2),
            "used_codes": int((counts > 0).sum()), "positions": int(counts.sum())}


def decode_alone(model, mel: np.ndarray, speaker: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One utterance through encode -> codebook lookup -> decode, alone (no batch, no padding):
    (codes (T',), decoded (n_mels, 2T'), target frames 1..2T' of `mel`)."""
    with torch.no_grad():
        codes, _ = model.encode({"mel": torch.from_numpy(mel)[None]})
        decoded = model.decode(model.quantizer.lookup(codes), torch.tensor([speaker]))
    codes, decoded = codes[0].numpy(), decoded[0].double().numpy()
    return codes, decoded, mel[:, 1:1 + decoded.shape[-1]].astype(np.float64)


def test_speech_metrics_equal_per_utterance_numpy_formulas(cli, speech_run, tmp_path):
    store, run = speech_run
    metrics = evaluated(cli, run, store, tmp_path / "m.json")
    model, state = load_model(run, "cpu")
    features = json.loads((store / "feature_config.json").read_text())
    tests = held_out_mels(store)
    assert len({mel.shape[1] for _, mel in tests}) == len(tests) == len(TEST_SECONDS)  # every length differs
    sse, frames, all_codes = 0.0, 0, []
    for entry, mel in tests:
        codes, decoded, target = decode_alone(model, mel, state["speakers"].index(entry["speaker"]))
        assert decoded.shape == target.shape == (features["n_mels"], 2 * len(codes))
        sse += float(((decoded - target) ** 2).sum())
        frames += target.shape[1]
        all_codes.append(codes)
    assert metrics["utterances"] == len(tests) and metrics["frames"] == frames
    # paper Table 3: squared error of the [0, 1]-scaled log-mel in dB^2, per mel bin and valid frame
    db2 = sse * features["top_db"] ** 2 / (features["n_mels"] * frames)
    assert metrics["mel_mse_db2"] == pytest.approx(db2, rel=1e-4)

    codebook_size = model.recipe.quantizer.codebook_size
    expected = code_statistics(np.concatenate(all_codes), codebook_size)
    assert expected["code_entropy_bits"] > 1  # enough spread for e^H, 2^H and H in nats to differ clearly
    for key in ("perplexity", "code_entropy_bits"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6), key
    assert metrics["used_codes"] == expected["used_codes"]
    latent_rate = features["sample_rate"] / features["hop_length"] / 2  # latents per second: half the frame rate
    assert metrics["entropy_bitrate_bps"] == pytest.approx(expected["code_entropy_bits"] * latent_rate, rel=1e-6)
    assert metrics["bitrate_bps"] == pytest.approx(math.log2(codebook_size) * latent_rate, rel=1e-9)


def test_image_mse_and_code_usage_equal_numpy_over_decoded_test_images(cli, tmp_path):
    arrays = mnist_arrays(n_train=12, n_test=7, seed=3)
    write_idx_tree(tmp_path / "data" / "FashionMNIST" / "raw", arrays)
    test_images = arrays["t10k-images-idx3-ubyte"]
    run = tmp_path / "run"
    result = cli("train", "fashion_mnist/sqvae_gauss1", "--data", tmp_path / "data", "--out", run,
                 "--set", "train.epochs=0", "--set", "train.steps=2", "--set", "data.batch_size=4",
                 "--set", "model.vision.channels=8", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    metrics = evaluated(cli, run, tmp_path / "data", tmp_path / "m.json")
    model, _ = load_model(run, "cpu")
    x = test_images[:, None].astype(np.float32) / 255  # (N, 1, 28, 28) in [0, 1]
    with torch.no_grad():
        codes, _ = model.encode({"x": torch.from_numpy(x)})
        decoded = model.decode(model.quantizer.lookup(codes)).double().numpy()
    assert decoded.shape == x.shape and metrics["images"] == len(x)
    errors = decoded - x
    assert float(np.mean(np.abs(errors))) != pytest.approx(float(np.mean(errors**2)), rel=1e-2)  # MSE != MAE here
    assert metrics["mse"] == pytest.approx(float(np.mean(errors**2)), rel=1e-4)
    assert metrics["mse_x1e3"] == pytest.approx(1e3 * float(np.mean(errors**2)), rel=1e-4)
    expected = code_statistics(codes.numpy(), model.recipe.quantizer.codebook_size)
    assert metrics["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert metrics["used_codes"] == expected["used_codes"]
