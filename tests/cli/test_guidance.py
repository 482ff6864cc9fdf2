"""One accepted-audio rule for prepare and reconstruct/encode (what is left out is
counted and said), helpful recipe and --data errors, and a generator-only vocoder export that --vocoder takes."""
import json
import os
import stat

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import harmonic
from factories import TINY
from factories import make_store as make_vocoder_store

from sqaudio.config import list_recipes


def _corpus(root):
    for spk in ("spk1", "spk2"):
        (root / spk).mkdir(parents=True)
        sf.write(root / spk / f"{spk}_a.wav", harmonic(0.6, seed=1), 16000)
        sf.write(root / spk / f"{spk}_b.mp3", harmonic(0.7, seed=2), 16000)
        sf.write(root / spk / f"{spk}_c.opus", harmonic(0.6, seed=3), 16000, format="OGG", subtype="OPUS")
    (root / "spk1" / "spk1_d.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A ")
    (root / "spk1" / "notes.txt").write_text("transcripts")
    return root


# ---------------------------------------------------------------- one rule for audio inputs

def test_prepare_and_reconstruct_share_the_format_rule(cli, tiny_model, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    result = cli("prepare", corpus, tmp_path / "store", "--workers", "1", "--test-fraction", "0")
    assert result.exit_code == 0, result.output
    sources = {json.loads(line)["source"].rsplit(".", 1)[-1]
               for line in (tmp_path / "store/manifest.jsonl").read_text().splitlines()}
    assert sources == {"wav", "mp3", "opus"}  # mp3 is prepared, not silently dropped
    skipped = [json.loads(line) for line in (tmp_path / "store/skipped.jsonl").read_text().splitlines()]
    assert [s["source"].rsplit("/", 1)[-1] for s in skipped] == ["spk1_d.m4a"]
    assert "unsupported audio format .m4a" in skipped[0]["reason"]
    out = result.output.replace("\n", " ")
    assert "unsupported audio format .m4a" in out and "ignored 1 file(s) that are not audio (.txt x1)" in out

    result = cli("encode", corpus, "-o", tmp_path / "codes", "--model", tiny_model)
    assert result.exit_code == 0, result.output
    codes = sorted(p.relative_to(tmp_path / "codes").as_posix() for p in (tmp_path / "codes").rglob("*.npy"))
    assert codes == [f"{s}/{s}_{x}.npy" for s in ("spk1", "spk2") for x in "abc"]  # same files as prepare took
    assert "ignored 2 file(s)" in result.stderr and ".m4a (unsupported audio) x1" in result.stderr
    assert ".txt x1" in result.stderr
    result = cli("reconstruct", corpus / "spk1" / "spk1_d.m4a", "-o", tmp_path / "x.wav", "--model", tiny_model)
    assert result.exit_code == 2 and "unsupported audio format .m4a" in result.stderr


# ---------------------------------------------------------------- recipe and --data errors that help

def test_recipe_typo_suggests_the_closest_names(cli, tmp_path):
    result = cli("train", "vctk/sqvae_guass4", "--data", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "did you mean vctk/sqvae_gauss4" in line and line.count("/") < 8  # a few names, not all of them
    assert len(list_recipes()) > 10


def test_vocoder_recipe_given_to_train_points_to_vocoder_train(cli, tmp_path):
    result = cli("train", "vocoder/tiny", "--data", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "sqaudio vocoder train" in result.stderr and "--recipe tiny" in result.stderr
    assert "vocoder/tiny" not in list_recipes()
    listed = cli("recipes").stdout.splitlines()
    assert "vctk/sqvae_gauss4" in listed and "vocoder/hifigan" in listed


@pytest.mark.parametrize("command", ["evaluate", "evaluate --audio", "train", "vocoder train"])
def test_a_corpus_given_as_features_is_not_suggested_as_the_output(cli, tiny_model, tmp_path, command):
    """Every command that reads prepared features (one check, in open_store)."""
    corpus = _corpus(tmp_path / "corpus")
    args = {"evaluate": ["evaluate", tiny_model, "--data", corpus, "--device", "cpu"],
            "evaluate --audio": ["evaluate", tiny_model, "--data", corpus, "--device", "cpu", "--audio"],
            "train": ["train", "demo/tiny", "--data", corpus, "--out", tmp_path / "run", "--device", "cpu"],
            "vocoder train": ["vocoder", "train", corpus, "--out", tmp_path / "voc", "--device", "cpu"]}[command]
    result = cli(*args)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert f"sqaudio prepare {corpus} FEATURES_DIR" in line and f"prepare CORPUS {corpus}" not in line
    assert not (corpus / "manifest.jsonl").exists()


# ---------------------------------------------------------------- generator-only vocoder export

def test_vocoder_export_is_generator_only_and_accepted_by_vocoder(cli, tiny_model, tmp_path):
    store = make_vocoder_store(tmp_path / "vstore", rate=16000)
    run = tmp_path / "voc"
    result = cli("vocoder", "train", store, "--out", run, "--recipe", "tiny", "--device", "cpu", "--quiet",
                 *[a for o in TINY for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    for written in (run / "config.yaml", *run.glob("checkpoint-*.pt")):  # the umask's mode, not mkstemp's 0600
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written
    out = tmp_path / "export" / "tiny.pt"
    result = cli("vocoder", "export", run, out)
    assert result.exit_code == 0, result.output
    assert f"{out}" in result.stdout.replace("\n", "")
    full = torch.load(sorted(run.glob("checkpoint-*.pt"))[-1], weights_only=True)
    slim = torch.load(out, weights_only=True)
    assert "discriminator" in full and set(slim) & {"discriminator", "generator_optimizer", "discriminator_optimizer"} == set()
    assert out.stat().st_size < sorted(run.glob("checkpoint-*.pt"))[-1].stat().st_size
    info = cli("vocoder", "info", out)
    assert info.exit_code == 0 and "generator only" in info.stdout
    src = tmp_path / "spk0_x.wav"
    sf.write(src, harmonic(0.8), 16000)
    for vocoder, target in ((run, "a.wav"), (out, "b.wav")):
        result = cli("reconstruct", src, "-o", tmp_path / target, "--model", tiny_model, "--vocoder", vocoder)
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0])
    again = cli("vocoder", "export", run, out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
