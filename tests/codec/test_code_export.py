"""`sqaudio encode --format zerospeech` writes, line by line, exactly the codebook vector of each code that
`--format npy` writes for the same input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import harmonic
from factories import spread_codes

from sqaudio.models.sqvae import load_model

RATE = 16000


def varied_speech(seed: int = 0) -> np.ndarray:
    """Harmonic segments of different pitch between noise bursts and near-silence: log-mels that change a lot."""
    rng = np.random.default_rng(seed)
    noise = lambda seconds, level: (level * rng.standard_normal(int(seconds * RATE))).astype(np.float32)  # noqa: E731
    return np.concatenate([harmonic(0.3, RATE, f0=100), noise(0.2, 0.3), harmonic(0.3, RATE, f0=300),
                           noise(0.2, 0.002), harmonic(0.4, RATE, f0=180, seed=1)])


@torch.no_grad()
def spread_model(run: Path, mel: np.ndarray, out: Path) -> np.ndarray:
    """Save to `out` a copy of the model at `run` whose codes vary along `mel`: latents centred and scaled (the
    encoder's last 1x1 conv) and codebook rows set to latents spread over the input. Returns the codebook (K, D)."""
    model, _ = load_model(run, "cpu")
    spread_codes(model, [mel])
    codebook = model.quantizer.codebook
    state = torch.load(sorted(Path(run).glob("checkpoint-*.pt"))[-1], weights_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "model": model.state_dict()}, out)
    return codebook.numpy().astype(np.float64)


def test_zerospeech_lines_are_the_codebook_vectors_of_the_npy_codes(cli, tiny_model, tmp_path):
    corpus = tmp_path / "corpus" / "spk0"
    corpus.mkdir(parents=True)
    sf.write(corpus / "spk0_x.wav", varied_speech(), RATE)
    result = cli("prepare", tmp_path / "corpus", tmp_path / "store", "--workers", "1", "--quiet")
    assert result.exit_code == 0, result.output
    mel = np.load(next((tmp_path / "store").rglob("spk0_x.npy"))).astype(np.float32)
    model = tmp_path / "spread" / "checkpoint-4.pt"
    codebook = spread_model(tiny_model, mel[:, : mel.shape[1] - mel.shape[1] % 2], model)

    for fmt in ("npy", "zerospeech"):
        result = cli("encode", corpus / "spk0_x.wav", "-o", tmp_path / fmt, "--model", model, "--format", fmt,
                     "--device", "cpu")
        assert result.exit_code == 0, result.output
    codes = np.load(tmp_path / "npy" / "spk0_x.npy")
    lines = (tmp_path / "zerospeech" / "spk0_x.txt").read_text().strip().splitlines()
    assert len(np.unique(codes)) >= 8 and (np.diff(codes) != 0).sum() >= 8  # codes change along the input
    assert len(lines) == len(codes)
    vectors = np.array([[float(v) for v in line.split()] for line in lines])
    assert vectors.shape == (len(codes), codebook.shape[1])
    np.testing.assert_allclose(vectors, codebook[codes], rtol=0, atol=1e-6)  # written with 6 decimals
    nearest = ((vectors[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(nearest, codes)


@pytest.mark.parametrize("fmt,files", [("npy", {"x.npy", "x.json"}), ("zerospeech", {"x.txt"})])
def test_each_format_writes_only_its_files(cli, tiny_model, tmp_path, fmt, files):
    sf.write(tmp_path / "x.wav", harmonic(0.6, RATE), RATE)
    result = cli("encode", tmp_path / "x.wav", "-o", tmp_path / "out", "--model", tiny_model, "--format", fmt,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == files
