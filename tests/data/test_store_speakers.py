"""speakers.json (the speaker table a model is trained with) lists exactly the speakers with a training utterance:
speakers met only in the test split are in the manifest but never in the table."""
from __future__ import annotations

import json
from pathlib import Path

import soundfile as sf
from conftest import harmonic

RATE = 16000


def _wav(path: Path, seconds: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, harmonic(seconds, RATE, f0=100 + 10 * seed, seed=seed), RATE)


def zerospeech_tree(root: Path) -> Path:
    """english/train/{voice,unit}/ with speakers V001 and S002; english/test/ with V001 and the test-only S003."""
    lang = root / "english"
    for i, rel in enumerate(["train/voice/V001_0001.wav", "train/voice/V001_0002.wav", "train/unit/S002_0001.wav",
                             "test/V001_0003.wav", "test/S003_0001.wav", "test/S003_0002.wav"]):
        _wav(lang / rel, 0.3 + 0.05 * i, seed=i)
    return root


def read_store(store: Path) -> tuple[list[str], list[dict]]:
    speakers = json.loads((store / "speakers.json").read_text())
    entries = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return speakers, entries


def train_speakers(entries: list[dict]) -> list[str]:
    return sorted({e["speaker"] for e in entries if e["split"] == "train"})


def test_zerospeech_test_only_speaker_is_not_in_the_speaker_table(cli, tmp_path):
    corpus = zerospeech_tree(tmp_path / "corpus")
    result = cli("prepare", corpus, tmp_path / "store", "--workers", "1", "--quiet")
    assert result.exit_code == 0, result.output
    speakers, entries = read_store(tmp_path / "store")
    assert {(e["speaker"], e["split"]) for e in entries} == {
        ("V001", "train"), ("S002", "train"), ("V001", "test"), ("S003", "test")}
    assert speakers == train_speakers(entries) == ["S002", "V001"]


def test_split_files_test_only_speaker_is_not_in_the_speaker_table(cli, tmp_path):
    corpus = tmp_path / "corpus"
    for i, name in enumerate(["a/one", "a/two", "b/three", "c/four"]):
        _wav(corpus / f"{name}.wav", 0.3 + 0.05 * i, seed=i)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([["a/one", 0, None, "train/spkA/spkA_1"], ["a/two", 0, 0.2, "train/spkA/spkA_2"],
                                 ["b/three", 0, None, "train/spkB/spkB_3"]]))
    test = tmp_path / "test.json"
    test.write_text(json.dumps([["c/four", "spkZ"], ["a/two", "spkA"]]))
    result = cli("prepare", corpus, tmp_path / "store", "--split-file", train, "--split-file", test,
                 "--workers", "1", "--quiet")
    assert result.exit_code == 0, result.output
    speakers, entries = read_store(tmp_path / "store")
    assert "spkZ" in {e["speaker"] for e in entries if e["split"] == "test"}
    assert speakers == train_speakers(entries) == ["spkA", "spkB"]


def test_merged_shards_list_only_training_speakers(cli, tmp_path):
    corpus = zerospeech_tree(tmp_path / "corpus")
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}")
        result = cli("prepare", corpus, shards[-1], "--shard", f"{i}/2", "--workers", "1", "--quiet")
        assert result.exit_code == 0, result.output
    for shard in shards:
        speakers, entries = read_store(shard)
        assert speakers == train_speakers(entries)
    result = cli("merge-stores", tmp_path / "merged", *shards, "--quiet")
    assert result.exit_code == 0, result.output
    speakers, entries = read_store(tmp_path / "merged")
    assert len(entries) == 6 and "S003" in {e["speaker"] for e in entries}
    assert speakers == ["S002", "V001"]
