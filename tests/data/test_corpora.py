"""Corpus layouts on small fake trees (listing reads no audio, so empty files stand in for recordings)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sqaudio.data.corpora import detect_layout, held_out_split, list_corpus, read_split_files
from sqaudio.errors import UserError


def touch(root: Path, *paths: str) -> None:
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def by_id(listing):
    return {u.id: u for u in listing.utterances}


def test_vctk_080(tmp_path):
    touch(tmp_path, "speaker-info.txt", "txt/p225/p225_001.txt",
          *[f"wav48/p225/p225_{i:03d}.wav" for i in range(1, 31)],
          *[f"wav48/p315/p315_{i:03d}.wav" for i in range(1, 4)],
          "wav48/p225/._p225_001.wav", "wav48/p225/notes.txt", "wav48/p315/.DS_Store")
    listing = list_corpus(tmp_path)
    assert listing.layout.startswith("VCTK 0.80")
    utts = by_id(listing)
    assert len(utts) == 33 and {u.speaker for u in utts.values()} == {"p225", "p315"}
    assert utts["p225_007"].path == tmp_path / "wav48/p225/p225_007.wav"
    assert {u.split for u in utts.values()} <= {"train", "test"}
    assert all(any(u.split == "train" for u in utts.values() if u.speaker == s) for s in ("p225", "p315"))


def vctk_092(root: Path) -> Path:
    files = []
    for spk in ("p225", "p280", "p362"):
        for i in range(1, 21):
            files.append(f"wav48_silence_trimmed/{spk}/{spk}_{i:03d}_mic1.flac")
            if spk != "p280" and not (spk == "p362" and i > 15):
                files.append(f"wav48_silence_trimmed/{spk}/{spk}_{i:03d}_mic2.flac")
    files += ["wav48_silence_trimmed/p225/p225_odd.flac", "wav48_silence_trimmed/log.txt", "speaker-info.txt"]
    touch(root, *files)
    return root


@pytest.mark.parametrize("mic", [1, 2])
def test_vctk_092_mics(tmp_path, mic):
    listing = list_corpus(vctk_092(tmp_path), "vctk", mic=mic)
    assert listing.layout == f"VCTK 0.92 (wav48_silence_trimmed/, mic{mic})"
    utts = by_id(listing)
    reasons = Counter(s["reason"] for s in listing.skipped)
    assert reasons["unrecognised VCTK 0.92 file name (expected <spk>_<n>_mic1|2)"] == 1
    if mic == 1:
        assert len(utts) == 60 and reasons[f"no mic{mic} recording"] == 0
    else:  # p280 has no mic2 at all, p362 lacks 5 of them
        assert len(utts) == 35 and reasons["no mic2 recording"] == 25
        assert "p280" not in {u.speaker for u in utts.values()}
    assert all(u.path.name == f"{u.id}_mic{mic}.flac" for u in utts.values())
    assert "p225_001" in utts and utts["p225_001"].speaker == "p225"


def test_bad_mic_and_layout_names(tmp_path):
    vctk_092(tmp_path)
    with pytest.raises(UserError, match="--mic"):
        list_corpus(tmp_path, "vctk", mic=3)
    with pytest.raises(UserError, match="unknown corpus layout"):
        list_corpus(tmp_path, "librispeech")
    with pytest.raises(UserError, match="not a VCTK corpus"):
        list_corpus(tmp_path / "wav48_silence_trimmed", "vctk")


def test_detection_descends_into_an_unpacked_archive_folder(tmp_path):
    vctk_092(tmp_path / "VCTK-Corpus-0.92")
    (tmp_path / "readme.txt").write_text("downloaded")
    assert detect_layout(tmp_path) == ("vctk", tmp_path / "VCTK-Corpus-0.92")
    zerospeech(tmp_path / "2019")
    with pytest.raises(UserError, match="several corpora"):
        detect_layout(tmp_path)


def zerospeech(root: Path) -> Path:
    touch(root, "english/train/unit/S015_0361841101.wav", "english/train/unit/S015_0361841102.wav",
          "english/train/unit/S133_0000000001.wav", "english/train/voice/V001_0001866840.wav",
          "english/train/voice/V002_2316864420.wav", "english/train/parallel/source/S015_0000000047.wav",
          "english/train/parallel/voice/V001_0000000047.wav", "english/test/S002_0379088085.wav",
          "english/test/S131_0000000002.wav", "english/test/nospeaker.wav", "english/vads.txt")
    return root


def test_zerospeech_2019(tmp_path):
    listing = list_corpus(zerospeech(tmp_path))
    assert listing.layout == "ZeroSpeech 2019 (english)"
    utts = by_id(listing)
    assert len(utts) == 9
    assert {u.id: u.split for u in utts.values() if u.split == "test"} == {"S002_0379088085": "test",
                                                                           "S131_0000000002": "test"}
    assert utts["V001_0000000047"].speaker == "V001" and utts["V001_0000000047"].split == "train"
    assert utts["S015_0000000047"].path.parent.name == "source"
    assert [s["reason"] for s in listing.skipped] == ["no speaker prefix in the file name (expected SPK_id)"]
    # pointing at the language folder itself works too
    assert len(list_corpus(tmp_path / "english", "zerospeech2019").utterances) == 9


def test_folder_layout_nested_odd_names_and_duplicates(tmp_path):
    touch(tmp_path, "alice/a.wav", "alice/a.flac", "alice/session 2/take.1.OGG", "alice/session 2/deep/x.wav",
          "bob/bob_001.wav", "bob/ünïcode name.Wav", "loose.wav", "carol/readme.txt", "alice/.hidden/y.wav")
    listing = list_corpus(tmp_path)
    assert listing.layout.startswith("folder")
    utts = by_id(listing)
    assert set(utts) == {"alice_a", "alice_session 2__take.1", "alice_session 2__deep__x", "bob_001",
                         "bob_ünïcode name"}
    assert utts["alice_a"].path.name == "a.flac"  # sorted paths: a.flac before a.wav; the second is a duplicate id
    reasons = sorted(s["reason"].split(" (")[0] for s in listing.skipped)
    assert reasons == ["audio directly in the corpus root", "duplicate utterance id 'alice_a'"]


def test_held_out_split_rules():
    pairs = [(f"s{s}", f"s{s}_{i}") for s in range(20) for i in range(100)]
    split = held_out_split(pairs, 0.05, seed=0)
    assert split == held_out_split(list(reversed(pairs)), 0.05, seed=0)  # order does not matter
    share = sum(v == "test" for v in split.values()) / len(split)
    assert 0.035 < share < 0.065
    grown = held_out_split(pairs + [(f"s{s}", f"s{s}_new{i}") for s in range(20) for i in range(50)], 0.05, seed=0)
    assert all(grown[k] == v for k, v in split.items())  # adding files moves no existing utterance
    assert held_out_split(pairs, 0.05, seed=1) != split
    assert set(held_out_split(pairs, 0.0).values()) == {"train"}
    assert set(held_out_split(pairs, 1.0).values()) == {"test"}
    tiny = held_out_split([("a", "a1"), ("a", "a2"), ("b", "b1")], 0.99)
    assert tiny["b1"] == "train" and sorted([tiny["a1"], tiny["a2"]]) == ["test", "train"]
    with pytest.raises(UserError):
        held_out_split(pairs, 1.5)


def test_reference_split_file_and_eval_list(tmp_path):
    zerospeech(tmp_path)
    train = [["english/train/unit/S015_0361841101", 0.0, 13.13, "english/train/S015/S015_0361841101"],
             ["english/train/unit/S015_0361841102", 1.5, 2.0, "english/train/S015/S015_0361841102_b"],
             ["english/train/unit/S999_0000000000", 0.0, 1.0, "english/train/S999/S999_0000000000"]]
    test = [["english/test/S002_0379088085", 0.0, None, "english/test/S002/S002_0379088085"]]
    evaluation = [["english/train/parallel/voice/V001_0000000047", "V001"]]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    (tmp_path / "mse.json").write_text(json.dumps(evaluation))
    listing = list_corpus(tmp_path, split_files=[tmp_path / name for name in ("train.json", "test.json", "mse.json")])
    utts = by_id(listing)
    assert set(utts) == {"S015_0361841101", "S015_0361841102_b", "S002_0379088085", "V001_0000000047"}
    b = utts["S015_0361841102_b"]
    assert (b.speaker, b.split, b.offset, b.duration) == ("S015", "train", 1.5, 2.0)
    assert b.path == tmp_path / "english/train/unit/S015_0361841102.wav"
    assert utts["S002_0379088085"].split == "test" and utts["S002_0379088085"].duration is None
    assert (utts["V001_0000000047"].speaker, utts["V001_0000000047"].split) == ("V001", "test")
    assert [s["reason"].split(" (")[0] for s in listing.skipped] == ["missing audio file"]


def test_split_file_csv_and_malformed_entries(tmp_path):
    zerospeech(tmp_path)
    row = "english/train/voice/V002_2316864420,0.0,6.53,english/train/V002/V002_2316864420\n"
    (tmp_path / "train.csv").write_text(row)
    assert [u.speaker for u in read_split_files([tmp_path / "train.csv"], tmp_path).utterances] == ["V002"]
    for bad in ([["a", "b", "c"]], [["x", -1.0, 1.0, "a/b/c"]], {"not": "a list"}, [["only_one_part", 0, 1, "c"]]):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(UserError):
            read_split_files([tmp_path / "bad.json"], tmp_path)
    (tmp_path / "broken.json").write_text("[[")
    with pytest.raises(UserError, match="cannot read split file"):
        read_split_files([tmp_path / "broken.json"], tmp_path)
    with pytest.raises(UserError, match="not found"):
        read_split_files([tmp_path / "missing.json"], tmp_path)


def test_missing_unrecognised_and_empty_corpora(tmp_path):
    with pytest.raises(UserError, match="not found"):
        list_corpus(tmp_path / "nope")
    (tmp_path / "file.wav").write_bytes(b"")
    with pytest.raises(UserError, match="not a folder"):
        list_corpus(tmp_path / "file.wav")
    touch(tmp_path / "texts", "a/readme.txt")
    with pytest.raises(UserError, match="cannot recognise"):
        list_corpus(tmp_path / "texts")
    touch(tmp_path / "emptyvctk", "wav48/p225/notes.txt")
    with pytest.raises(UserError, match="no usable audio"):
        list_corpus(tmp_path / "emptyvctk")
