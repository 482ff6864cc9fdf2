"""Outputs are named by one rule, never collide or overwrite silently, respect the umask, and every command says
where they went (summaries on stdout, notes/progress/errors on stderr)."""
import json
import os
import shutil
import stat

import numpy as np
import pytest
import soundfile as sf
from conftest import harmonic


def _wav(path, seconds=0.9, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, harmonic(seconds, seed=seed), 16000, format=fmt)
    return path


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def store(tiny_model):
    return tiny_model.parent / "features"


# ---------------------------------------------------------------- repeated names keep their folders

def test_repeated_file_names_keep_the_relative_folders(cli, tiny_model, tmp_path):
    a = _wav(tmp_path / "in/a/x.flac", seed=1, fmt="FLAC")
    b = _wav(tmp_path / "in/b/x.flac", seconds=1.2, seed=2, fmt="FLAC")
    result = cli("reconstruct", a, b, "-o", tmp_path / "rec", "--model", tiny_model, "--speaker", "spk0")
    assert result.exit_code == 0, result.output
    ra, rb = sf.read(tmp_path / "rec/a/x.wav")[0], sf.read(tmp_path / "rec/b/x.wav")[0]
    assert (len(ra), len(rb)) == (round(0.9 * 16000), round(1.2 * 16000))  # each input has its own output
    assert cli("encode", tmp_path / "in", "-o", tmp_path / "codes", "--model", tiny_model).exit_code == 0
    assert sorted(p.relative_to(tmp_path / "codes").as_posix() for p in (tmp_path / "codes").rglob("*")
                  if p.is_file()) == ["a/x.json", "a/x.npy", "b/x.json", "b/x.npy"]
    result = cli("decode", tmp_path / "codes", "-o", tmp_path / "dec", "--model", tiny_model, "--speaker", "spk0")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(sf.read(tmp_path / "dec/b/x.wav")[0], rb)


def test_outputs_that_would_collide_are_refused_before_writing(cli, tiny_model, tmp_path):
    _wav(tmp_path / "in/x.wav", seed=1)
    _wav(tmp_path / "in/x.flac", seed=2, fmt="FLAC")
    for command in ("reconstruct", "encode"):
        result = cli(command, tmp_path / "in", "-o", tmp_path / "out", "--model", tiny_model)
        _one_line_error(result, "x.wav", "x.flac", "both")
    assert not (tmp_path / "out").exists()


def test_existing_outputs_need_overwrite(cli, tiny_model, tmp_path):
    src = _wav(tmp_path / "speech.wav")
    assert cli("encode", src, "-o", tmp_path / "codes", "--model", tiny_model).exit_code == 0
    out = tmp_path / "dec"
    assert cli("decode", tmp_path / "codes", "-o", out, "--model", tiny_model, "--speaker", "spk0").exit_code == 0
    first = (out / "speech.wav").read_bytes()
    result = cli("decode", tmp_path / "codes", "-o", out, "--model", tiny_model, "--speaker", "spk1")
    _one_line_error(result, "speech.wav", "exists", "--overwrite")
    assert (out / "speech.wav").read_bytes() == first  # the spk0 result is still there
    result = cli("decode", tmp_path / "codes", "-o", out, "--model", tiny_model, "--speaker", "spk1", "--overwrite")
    assert result.exit_code == 0 and (out / "speech.wav").read_bytes() != first
    _one_line_error(cli("encode", src, "-o", tmp_path / "codes", "--model", tiny_model), "exists")
    _one_line_error(cli("reconstruct", src, "-o", out / "speech.wav", "--model", tiny_model), "exists")


# ---------------------------------------------------------------- -o x.wav with several inputs

def test_wav_output_with_several_inputs_is_refused(cli, tiny_model, tmp_path):
    a, b = _wav(tmp_path / "one.wav", seed=1), _wav(tmp_path / "two_in.wav", seed=2)
    for command, inputs in (("reconstruct", (a, b)), ("decode", ())):
        if command == "decode":
            assert cli("encode", a, b, "-o", tmp_path / "codes", "--model", tiny_model).exit_code == 0
            inputs = (tmp_path / "codes",)
        result = cli(command, *inputs, "-o", tmp_path / "out/two.wav", "--model", tiny_model)
        _one_line_error(result, "two.wav", "2 inputs", "folder")
    _one_line_error(cli("encode", a, "-o", tmp_path / "codes.npy", "--model", tiny_model), "folder")
    assert not (tmp_path / "out").exists() and not (tmp_path / "codes.npy").exists()


# ---------------------------------------------------------------- compare never collapses runs

def test_compare_names_runs_by_distinct_path_suffix(cli, tiny_model, store, tmp_path):
    runs = [tmp_path / "runs/a/x", tmp_path / "runs/b/x", tmp_path / "runs/y"]
    for run in runs:
        shutil.copytree(tiny_model, run)
    result = cli("compare", *runs, "--data", store, "--json", tmp_path / "all.json", "--png", tmp_path / "c.png",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "all.json").read_text())
    assert list(rows) == ["a/x", "b/x", "y"]
    assert [rows[k]["run"] for k in rows] == [str(r) for r in runs]
    table = result.stdout
    assert "a/x" in table and "b/x" in table
    assert f"wrote chart: {tmp_path / 'c.png'}" in result.stdout.replace("\n", "")
    assert f"wrote JSON: {tmp_path / 'all.json'}" in result.stdout.replace("\n", "")
    _one_line_error(cli("compare", runs[0], runs[0], "--device", "cpu"), "twice")


# ---------------------------------------------------------------- evaluate --list keeps the split result

def test_evaluate_list_is_kept_apart_from_the_split_result(cli, tiny_model, store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run)
    assert cli("evaluate", run, "--data", store, "--device", "cpu").exit_code == 0
    full = json.loads((run / "eval-test.json").read_text())
    assert full["split"] == "test" and full["list"] is None
    listing = tmp_path / "lists/mini.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps([["spk1/spk1_0", "spk1"]]))
    result = cli("evaluate", run, "--data", store, "--list", listing, "--json", tmp_path / "mini.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval-test.json").read_text()) == full  # untouched
    mine = json.loads((run / "eval-list-mini.json").read_text())
    assert mine["list"] == str(listing) and mine["utterances"] == 1 < full["utterances"]
    out = result.stdout.replace("\n", "")
    assert f"{run / 'eval-list-mini.json'}" in out and f"wrote JSON: {tmp_path / 'mini.json'}" in out
    _one_line_error(cli("evaluate", run, "--data", store, "--json", tmp_path / "mini.json", "--device", "cpu"),
                    "exists", "--overwrite")
    other = tmp_path / "other/mini.json"
    other.parent.mkdir()
    other.write_text(json.dumps([["spk0/spk0_0", "spk0"]]))
    _one_line_error(cli("evaluate", run, "--data", store, "--list", other, "--device", "cpu"), "another list")


# ---------------------------------------------------------------- the umask decides the mode

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_respect_the_umask(cli, tiny_model, tmp_path, umask):
    from sqaudio.codec.vocoders import export_generator  # noqa: F401  (same atomic writer as every output

    old = os.umask(umask)
    try:
        src = _wav(tmp_path / "spk0_a.wav")
        assert cli("reconstruct", src, "-o", tmp_path / "out.wav", "--model", tiny_model,
                   "--plot", tmp_path / "mel.png").exit_code == 0
        assert cli("encode", src, "-o", tmp_path / "codes", "--model", tiny_model).exit_code == 0
        assert cli("train", "demo/tiny", "--data", tiny_model.parent / "features", "--out", tmp_path / "run",
                   "--set", "train.steps=1", "--quiet", "--device", "cpu").exit_code == 0
    finally:
        os.umask(old)
    files = [tmp_path / "out.wav", tmp_path / "mel.png", tmp_path / "codes/spk0_a.npy", tmp_path / "codes/spk0_a.json",
             *(tmp_path / "run").glob("checkpoint-*.pt")]
    assert len(files) == 5
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ---------------------------------------------------------------- the speaker used is said

def test_fallback_speaker_is_announced(cli, tiny_model, tmp_path):
    src = _wav(tmp_path / "speech.wav")
    result = cli("reconstruct", src, "-o", tmp_path / "o.wav", "--model", tiny_model)
    assert result.exit_code == 0
    assert "using speaker spk0" in result.stderr and "--speaker" in result.stderr
    named = _wav(tmp_path / "spk1_001.wav")
    result = cli("reconstruct", named, "-o", tmp_path / "n.wav", "--model", tiny_model)
    assert result.exit_code == 0 and "using speaker" not in result.output and "spk1" in result.stdout
    result = cli("encode", src, "-o", tmp_path / "codes", "--model", tiny_model)
    assert "using speaker spk0" in result.stderr
    assert json.loads((tmp_path / "codes/speech.json").read_text())["speaker"] == "spk0"
    assert "--speaker" in cli("reconstruct", "--help").stdout


# ---------------------------------------------------------------- streams

def test_summaries_on_stdout_notes_and_errors_on_stderr(cli, tiny_model, tmp_path):
    folder = tmp_path / "in"
    _wav(folder / "spk0_a.wav")
    (folder / "notes.txt").write_text("not audio")
    result = cli("reconstruct", folder, "-o", tmp_path / "rec", "--model", tiny_model)
    assert result.exit_code == 0
    assert "reconstructed" in result.stdout and "spk0_a.wav" in result.stdout  # the table with the outputs
    assert (tmp_path / "rec" / "spk0_a.wav").is_file()
    assert "ignored 1 file(s) that are not audio (.txt" in result.stderr and "ignored" not in result.stdout
    result = cli("encode", folder, "-o", tmp_path / "codes", "--model", tiny_model)
    assert f"wrote codes of 1 file(s) (npy): {tmp_path / 'codes'}" in result.stdout.replace("\n", "")
    result = cli("decode", tmp_path / "codes", "-o", tmp_path / "dec", "--model", tiny_model)
    assert f"wrote 1 wav(s): {tmp_path / 'dec'}" in result.stdout.replace("\n", "")
    result = cli("reconstruct", tmp_path / "missing.wav", "-o", tmp_path / "x.wav", "--model", tiny_model)
    assert result.exit_code == 2 and result.stdout == "" and "not found" in result.stderr


def test_train_summary_on_stdout_names_every_output(cli, tiny_store, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", run, "--set", "train.steps=2",
                 "--set", "train.log_every=1", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    out = result.stdout.replace("\n", "")
    assert "training finished" in out and "training finished" not in result.stderr
    for what, path in [("checkpoint", run / "checkpoint-2.pt"), ("config", run / "config.yaml"),
                       ("history", run / "history.jsonl"), ("self-annealing plot", run / "annealing.png")]:
        assert f"wrote {what}: {path}" in out and path.exists()
