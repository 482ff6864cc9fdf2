"""Outputs recorded from an earlier sqaudio (tests/golden/record.py) are reproduced bit for bit: its feature
store and checkpoint still load, `evaluate`, `encode` and `reconstruct` (Griffin-Lim) give the same JSON,
codes and samples, and training at the same seed gives the same weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

GOLDEN = Path(__file__).resolve().parent / "golden"
WAV = GOLDEN / "corpus" / "spkA" / "spkA_1.wav"


@pytest.fixture
def golden(tmp_path) -> Path:
    """A writable copy of the golden store and run (evaluate writes its JSON into the run directory)."""
    for name in ["store", "run"]:
        shutil.copytree(GOLDEN / name, tmp_path / name)
    return tmp_path


def test_evaluate_json_is_unchanged(cli, golden):
    out = golden / "evaluate.json"
    result = cli("evaluate", golden / "run", "--data", golden / "store", "--json", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    got, want = json.loads(out.read_text()), json.loads((GOLDEN / "outputs" / "evaluate.json").read_text())
    got.pop("checkpoint"), want.pop("checkpoint")  # an absolute path
    assert got == want


def test_encoded_codes_are_unchanged(cli, golden):
    result = cli("encode", WAV, "-o", golden / "codes", "--model", golden / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    want = GOLDEN / "outputs" / "codes"
    np.testing.assert_array_equal(np.load(golden / "codes" / "spkA_1.npy"), np.load(want / "spkA_1.npy"))
    assert json.loads((golden / "codes" / "spkA_1.json").read_text()) == json.loads((want / "spkA_1.json").read_text())


def test_griffin_lim_reconstruction_is_unchanged(cli, golden):
    out = golden / "reconstruct.wav"
    result = cli("reconstruct", WAV, "-o", out, "--model", golden / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    got, rate = sf.read(out, dtype="float32")
    want, want_rate = sf.read(GOLDEN / "outputs" / "reconstruct.wav", dtype="float32")
    assert rate == want_rate
    np.testing.assert_array_equal(got, want)


def test_training_at_the_same_seed_gives_the_same_weights(cli, golden):
    result = cli("train", "demo/tiny", "--data", golden / "store", "--out", golden / "again", "--set",
                 "train.steps=60", "--set", "train.checkpoint_every=60", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    got = torch.load(golden / "again" / "checkpoint-60.pt", weights_only=True)["model"]
    want = torch.load(GOLDEN / "run" / "checkpoint-60.pt", weights_only=True)["model"]
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
