"""The prepared-feature store (the contract between `prepare` and everything after it).

OUT_DIR/
  manifest.jsonl       one JSON object per utterance: id (unique), speaker, split (train|test), source (absolute audio
                       path), features (path relative to OUT_DIR of a float32 .npy (n_mels, frames), always
                       features/<split>/<speaker>/<id>.npy), frames (= 16 kHz samples // hop + 1), duration_s (of the
                       16 kHz audio used); entries from a split file also carry offset and duration (seconds, as given)
  feature_config.json  the FeatureConfig fields
  speakers.json        sorted ids of the speakers with at least one *train* utterance (index = speaker embedding
                       row); speakers seen only in test (e.g. ZeroSpeech's test speakers) are not in it
  skipped.jsonl        files that were skipped: {source, reason} (+ id, speaker when known)
  .prepare-journal.jsonl  only while a `prepare` run is unfinished: its finished entries, used to resume

manifest.jsonl is written last (atomically), so a store with a manifest is complete; every file is replaced by
rename, never written in place (see docs/data.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sqaudio.config import FeatureConfig, from_dict, to_dict
from sqaudio.errors import UserError

MANIFEST = "manifest.jsonl"
FEATURE_CONFIG = "feature_config.json"
SPEAKERS = "speakers.json"
SKIPPED = "skipped.jsonl"


@dataclass
class Store:
    """A prepared feature directory, read-only view."""

    root: Path
    entries: list[dict[str, Any]]
    features: FeatureConfig
    speakers: list[str]

    def split(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["split"] == name]

    def load(self, entry: dict[str, Any]) -> np.ndarray:
        """The (n_mels, frames) float32 feature of one manifest entry."""
        return np.load(self.root / entry["features"])

    def source_audio(self, entry: dict[str, Any]) -> np.ndarray:
        """The waveform the entry's features were computed from, read as `prepare` read it (its segment, down-mixed,
        resampled to the store's rate): float32 (samples,). A UserError names the entry when it is gone or bad."""
        from sqaudio.data.features import AudioError, load_audio

        source = Path(entry["source"])
        if not source.is_absolute() and not source.exists():
            source = self.root / source
        if not source.is_file():
            raise UserError(f"source audio of '{entry['id']}' not found: {source} (this reads the corpus the "
                            f"features in {self.root} were prepared from)")
        try:
            return load_audio(source, self.features, entry.get("offset") or 0.0, entry.get("duration"))
        except AudioError as err:
            raise UserError(f"source audio {source} of '{entry['id']}': {err}") from None


def open_store(root: str | Path) -> Store:
    """The prepared feature store at `root`; a UserError says how to make one (a corpus given instead gets a
    hint that names a separate output folder, never the corpus itself)."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        layout = _corpus_layout(root)
        if layout:
            raise UserError(f"{root} is a {layout} corpus, not prepared features: run `sqaudio prepare {root} "
                            f"FEATURES_DIR` (a new folder outside the corpus), then pass FEATURES_DIR")
        raise UserError(f"{root} has no {MANIFEST}: run `sqaudio prepare CORPUS {root}` first")
    entries = read_jsonl(manifest)
    features = from_dict(FeatureConfig, json.loads((root / FEATURE_CONFIG).read_text()), "features")
    speakers = json.loads((root / SPEAKERS).read_text())
    return Store(root, entries, features, speakers)


def _corpus_layout(root: Path) -> str | None:
    """The corpus layout recognised in `root` (vctk, zerospeech2019, folder), else None."""
    if not root.is_dir():
        return None
    from sqaudio.data.corpora import detect_layout

    try:
        return detect_layout(root)[0]
    except UserError:
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def feature_config_json(cfg: FeatureConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
