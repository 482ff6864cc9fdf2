"""`sqaudio prepare` end to end through the CLI: the store contract, splits, resume, bad input, options."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import SHARED_DATA, harmonic, signal_when

from sqaudio.data.store import open_store
from sqaudio.data.synthetic import make_demo_corpus

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
BAD = {  # file -> words its skip reason must contain
    "spk01/corrupt.wav": "unreadable", "spk01/empty.wav": "unreadable", "spk02/silent.wav": "silent",
    "spk02/nan.wav": "NaN", "spk03/short.wav": "too short", "spk03/header_only.wav": "empty",
}


def reference_logmel(wav: np.ndarray) -> np.ndarray:
    """The reference recipe written with librosa (independent of sqaudio.data.features)."""
    import librosa
    import scipy.signal

    wav = scipy.signal.lfilter([1, -0.97], [1], wav / np.abs(wav).max() * 0.999)
    mel = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=2048, hop_length=160, win_length=400, n_mels=80,
                                         fmin=50, power=1, pad_mode="reflect")
    return librosa.amplitude_to_db(mel, top_db=80) / 80 + 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3 synthetic speakers x 6 utterances, plus good files in other formats and one bad file of every kind."""
    root = tmp_path_factory.mktemp("corpus")
    make_demo_corpus(root, n_speakers=3, n_utts=6, seconds=(0.5, 0.9), seed=3)
    x = harmonic(0.6, rate=48000, f0=150, seed=9)
    sf.write(root / "spk01/pcm8.wav", harmonic(0.6, rate=8000, seed=1), 8000, subtype="PCM_U8")
    sf.write(root / "spk01/pcm24_48k.flac", x, 48000, subtype="PCM_24")
    sf.write(root / "spk02/pcm32.wav", harmonic(0.6, rate=22050, seed=2), 22050, subtype="PCM_32")
    sf.write(root / "spk02/stereo float.wav", np.stack([x, -x[::-1]], 1), 48000, subtype="FLOAT")
    (root / "spk01/corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64))
    (root / "spk01/empty.wav").write_bytes(b"")
    sf.write(root / "spk02/silent.wav", np.zeros(16000), 16000)
    sf.write(root / "spk02/nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(root / "spk03/short.wav", harmonic(0.03, seed=1), 16000)
    sf.write(root / "spk03/header_only.wav", np.zeros(0), 16000)
    return root


def prepared(cli, corpus: Path, out: Path, *args: str):
    result = cli("prepare", corpus, out, "--workers", "1", *args)
    assert result.exit_code == 0, result.output
    return result


def test_store_contract_splits_and_skips(cli, corpus, tmp_path):
    out = tmp_path / "store"
    result = prepared(cli, corpus, out, "--test-fraction", "0.25")
    assert "folder" in result.output and "skipped files (6" in result.output
    store = open_store(out)
    assert store.features.n_mels == 80 and store.features.sample_rate == 16000
    ids = [e["id"] for e in store.entries]
    assert len(ids) == len(set(ids)) == 3 * 6 + 4  # every good file exactly once
    assert {e["split"] for e in store.entries} == {"train", "test"}
    assert store.speakers == sorted({e["speaker"] for e in store.split("train")}) == ["spk01", "spk02", "spk03"]
    for e in store.entries:
        assert set(e) >= {"id", "speaker", "split", "source", "features", "frames", "duration_s"}
        assert e["features"] == f"features/{e['split']}/{e['speaker']}/{e['id']}.npy"  # relative
        mel = np.load(out / e["features"])
        assert mel.dtype == np.float32 and mel.shape == (80, e["frames"]) and np.isfinite(mel).all()
        assert e["frames"] == int(round(e["duration_s"] * 16000)) // 160 + 1
        assert abs(e["duration_s"] - sf.info(e["source"]).duration) < 1e-3
    first = next(e for e in store.entries if e["id"] == "spk01_001")
    assert np.abs(np.load(out / first["features"]) - reference_logmel(sf.read(first["source"])[0])).max() < 1e-4
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {Path(s["source"]).relative_to(corpus).as_posix(): s["reason"] for s in skipped}
    assert set(reasons) == set(BAD)
    for name, words in BAD.items():
        assert words in reasons[name], (name, reasons[name])
    assert not list(out.rglob("*.tmp")) and not (out / ".prepare-journal.jsonl").exists()


def test_resume_recomputes_only_missing_or_invalid(cli, corpus, tmp_path):
    out = tmp_path / "store"
    prepared(cli, corpus, out)
    entries = open_store(out).entries
    deleted, truncated, reshaped, kept = entries[0], entries[1], entries[2], entries[3:]
    (out / deleted["features"]).unlink()
    path = out / truncated["features"]
    path.write_bytes(path.read_bytes()[:-4])
    np.save(out / reshaped["features"], np.zeros((80, 3), np.float32))  # a valid .npy of the wrong length
    before = {e["id"]: (out / e["features"]).stat().st_mtime_ns for e in kept}
    result = prepared(cli, corpus, out)
    assert "3 computed, 19 already done" in result.output.replace("\n", " ")
    assert all((out / e["features"]).stat().st_mtime_ns == before[e["id"]] for e in kept)
    assert open_store(out).entries == entries


def test_killed_run_resumes_from_the_journal(cli, corpus, tmp_path):
    """A run killed before its manifest: the per-utterance journal (with a torn last line) is trusted after checks."""
    out = tmp_path / "store"
    prepared(cli, corpus, out)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").unlink()
    (out / ".prepare-journal.jsonl").write_text("\n".join(lines[:10]) + '\n{"id": "torn')
    result = prepared(cli, corpus, out)
    assert "12 computed, 10 already done" in result.output.replace("\n", " ")
    assert (out / "manifest.jsonl").read_text().splitlines() == lines


def test_changed_split_settings_move_files_and_drop_orphans(cli, corpus, tmp_path):
    out = tmp_path / "store"
    prepared(cli, corpus, out, "--test-fraction", "0")
    assert not open_store(out).split("test")
    prepared(cli, corpus, out, "--test-fraction", "0.5")
    store = open_store(out)
    on_disk = {p.relative_to(out).as_posix() for p in (out / "features").rglob("*.npy")}
    assert on_disk == {e["features"] for e in store.entries} and store.split("test")


def test_process_pool_gives_the_same_store(cli, corpus, tmp_path):
    prepared(cli, corpus, tmp_path / "one")
    result = cli("prepare", corpus, tmp_path / "two", "--workers", "2", "--quiet")
    assert result.exit_code == 0, result.output
    one, two = open_store(tmp_path / "one"), open_store(tmp_path / "two")
    assert [{k: v for k, v in e.items()} for e in one.entries] == two.entries
    assert all(np.array_equal(one.load(a), two.load(b)) for a, b in zip(one.entries, two.entries))


def test_feature_options_and_mismatch(cli, corpus, tmp_path):
    out = tmp_path / "store40"
    prepared(cli, corpus, out, "--set", "n_mels=40", "--set", "features.fmin=80", "--quiet")
    store = open_store(out)
    assert (store.features.n_mels, store.features.fmin) == (40, 80.0)
    assert store.load(store.entries[0]).shape[0] == 40
    result = cli("prepare", corpus, out, "--workers", "1")
    assert result.exit_code == 2 and "other settings" in result.output
    assert "n_mels" in result.output and "40" in result.output and "fmin" in result.output
    for bad in ("n_mel=40", "n_mels=forty", "win_length=4096", "nonsense"):
        result = cli("prepare", corpus, tmp_path / "x", "--set", bad)
        assert result.exit_code == 2 and "error:" in result.output, (bad, result.output)


def test_missing_or_unrecognised_corpus_exit_2(cli, tmp_path):
    result = cli("prepare", tmp_path / "nope", tmp_path / "out")
    assert result.exit_code == 2 and "corpus folder not found" in result.output
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    result = cli("prepare", tmp_path / "docs", tmp_path / "out")
    assert result.exit_code == 2 and "cannot recognise" in result.output
    assert not (tmp_path / "out").exists()


def test_split_file_segments_and_vctk_missing_mic(cli, tmp_path):
    root = tmp_path / "vctk"
    for spk, mics in (("p225", (1, 2)), ("p280", (1,))):
        for i in range(1, 4):
            for mic in mics:
                path = root / "wav48_silence_trimmed" / spk / f"{spk}_{i:03d}_mic{mic}.flac"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, harmonic(1.0, rate=48000, f0=100 + 30 * i + 5 * mic, seed=i), 48000)
    result = prepared(cli, root, tmp_path / "mic2", "--mic", "2")
    assert "VCTK 0.92" in result.output and "no mic2 recording" in result.output
    assert {e["speaker"] for e in open_store(tmp_path / "mic2").entries} == {"p225"}
    split = [["wav48_silence_trimmed/p225/p225_001_mic1", 0.25, 0.5, "x/train/p225/seg_a"],
             ["wav48_silence_trimmed/p225/p225_002_mic1", 0.0, None, "x/test/p225/whole_b"]]
    (tmp_path / "split.json").write_text(json.dumps(split))
    prepared(cli, root, tmp_path / "seg", "--split-file", tmp_path / "split.json")
    entries = {e["id"]: e for e in open_store(tmp_path / "seg").entries}
    assert (entries["seg_a"]["offset"], entries["seg_a"]["duration"], entries["seg_a"]["split"]) == (0.25, 0.5, "train")
    assert entries["seg_a"]["frames"] == 8000 // 160 + 1 and entries["whole_b"]["frames"] == 16000 // 160 + 1
    assert entries["whole_b"]["split"] == "test"


@pytest.mark.skipif(not (SHARED_DATA / "vctk-mini").is_dir(), reason="../shared/data/vctk-mini not present")
def test_real_vctk_mini_subset(cli, tmp_path):
    src = SHARED_DATA / "vctk-mini"
    for spk in ("p901", "p903"):
        files = sorted((src / "wav48_silence_trimmed" / spk).glob("*_mic1.flac"))[:5]
        (tmp_path / "vctk" / "wav48_silence_trimmed" / spk).mkdir(parents=True)
        for f in files:
            (tmp_path / "vctk" / "wav48_silence_trimmed" / spk / f.name).symlink_to(f)
    shutil.copy(src / "speaker-info.txt", tmp_path / "vctk")
    result = prepared(cli, tmp_path / "vctk", tmp_path / "out")
    assert "VCTK 0.92" in result.output
    store = open_store(tmp_path / "out")
    assert len(store.entries) == 10 and store.speakers == ["p901", "p903"]
    entry = store.entries[0]
    ref = reference_logmel(sf.read(entry["source"])[0])
    assert np.abs(store.load(entry) - ref).max() < 1e-4


@pytest.mark.skipif(not (SHARED_DATA / "zerospeech-mini").is_dir(), reason="../shared/data/zerospeech-mini not present")
def test_real_zerospeech_mini_subset(cli, tmp_path):
    src = SHARED_DATA / "zerospeech-mini" / "english"
    for sub in ("train/unit", "train/voice", "test"):
        (tmp_path / "zs" / "english" / sub).mkdir(parents=True)
        for f in sorted((src / sub).glob("*.wav"))[:3]:
            (tmp_path / "zs" / "english" / sub / f.name).symlink_to(f)
    prepared(cli, tmp_path / "zs", tmp_path / "out")
    store = open_store(tmp_path / "out")
    assert len(store.split("train")) == 6 and len(store.split("test")) == 3
    assert all(e["id"].startswith(e["speaker"] + "_") for e in store.entries)


def test_demo_corpus_is_deterministic_speechlike_and_speakers_differ(tmp_path):
    import librosa

    from sqaudio.data.synthetic import make_voices

    a = make_demo_corpus(tmp_path / "a", n_speakers=2, n_utts=2, seconds=(1.0, 1.5), seed=7)
    b = make_demo_corpus(tmp_path / "b", n_speakers=2, n_utts=2, seconds=(1.0, 1.5), seed=7)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    pitches = []
    for voice in make_voices(2, seed=7):
        wav, rate = sf.read(tmp_path / "a" / voice.name / f"{voice.name}_001.wav")
        assert rate == 16000 and 1.0 <= len(wav) / rate <= 1.5 and 0.3 <= np.abs(wav).max() <= 0.8
        loud = librosa.feature.rms(y=wav, frame_length=1024, hop_length=256)[0] > 0.05 * np.abs(wav).max()
        assert 0.3 < loud.mean() < 0.95  # sounding stretches and pauses
        f0 = librosa.yin(wav, fmin=60, fmax=400, sr=rate, frame_length=1024, hop_length=256)
        pitches.append(np.median(f0[loud[: len(f0)]]))
        assert abs(pitches[-1] - voice.f0) < 0.2 * voice.f0
    assert pitches[1] > pitches[0] * 1.3  # a low and a high voice


def test_prepare_stopped_by_sigterm_exits_143_and_resumes(tmp_path):
    corpus = tmp_path / "corpus"
    for s in range(2):
        (corpus / f"spk{s}").mkdir(parents=True)
        for u in range(30):
            sf.write(corpus / f"spk{s}" / f"u{u}.wav", harmonic(2.0, seed=u, f0=100 + 10 * s), 16000)
    out = tmp_path / "features"
    cmd = [sys.executable, "-m", "sqaudio", "prepare", str(corpus), str(out), "--corpus", "folder", "--workers", "1",
           "--quiet"]
    code, err = signal_when(cmd, (out / ".prepare-journal.jsonl").exists, signal.SIGTERM, ONE_THREAD)
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err
    assert subprocess.run(cmd, env=ONE_THREAD, capture_output=True, timeout=300).returncode == 0
    assert (out / "manifest.jsonl").is_file()
