"""The prepared-feature store, read and written here only (the contract between `prepare` and everything after it).

OUT_DIR/
  manifest.jsonl       one JSON object per utterance: id (unique), speaker, split (train|test), source (absolute audio
                       path), features (path relative to OUT_DIR of a float32 .npy (n_mels, frames), always
                       features/<split>/<speaker>/<id>.npy), frames (= 16 kHz samples // hop + 1), duration_s (of the
                       16 kHz audio used); entries from a split file also carry offset and duration (seconds, as given)
  feature_config.json  the FeatureConfig fields
  speakers.json        sorted ids of the speakers with at least one *train* utterance (index = speaker embedding
                       row); speakers seen only in test (e.g. ZeroSpeech's test speakers) are not in it
  skipped.jsonl        files that were skipped: {source, reason} (+ id, speaker when known)
  packed/<split>.npy   float32 (total frames, n_mels): the split's features concatenated in manifest order, frame
                       major (a crop is one contiguous read), memory-mapped by training
  packed/<split>.json  its index: fingerprint (of the split's manifest entries it was built from), ids, offsets
                       (first row of each utterance), frames
  .prepare-journal.jsonl  only while a `prepare` run is unfinished: its finished entries, used to resume

manifest.jsonl is written last (atomically), so a store with a manifest is complete; every file is replaced by
rename, never written in place (see docs/data.md). A pack is trusted only when its index's fingerprint matches the
manifest; a store without one (made before packs, or stale) gets it on first training use when it is writable.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from sqaudio.config import FeatureConfig, from_dict, to_dict
from sqaudio.data.audio import AudioError, load_audio
from sqaudio.errors import UserError
from sqaudio.files import atomic_write, is_audio, save_npy

MANIFEST = "manifest.jsonl"
FEATURE_CONFIG = "feature_config.json"
SPEAKERS = "speakers.json"
SKIPPED = "skipped.jsonl"
JOURNAL = ".prepare-journal.jsonl"  # finished entries of an unfinished run (removed when the manifest is written)
FEATURES = "features"
PACKED = "packed"


@dataclass
class Store:
    """A prepared feature directory, read-only view.

    Args:
        root: the store folder.
        entries: the manifest entries, in manifest order.
        features: the feature settings the store was prepared with.
        speakers: the speaker table (index = speaker embedding row).
    """

    root: Path
    entries: list[dict[str, Any]]
    features: FeatureConfig
    speakers: list[str]

    def split(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["split"] == name]

    def load(self, entry: dict[str, Any], mmap: bool = False) -> np.ndarray:
        """The (n_mels, frames) float32 feature of one manifest entry (memory-mapped with `mmap`); a UserError names
        a missing, unreadable or mis-shaped file."""
        path = self.root / entry["features"]
        try:
            mel = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"cannot read features {path} (entry {entry.get('id')}): {err}; re-run prepare") from None
        expected = (self.features.n_mels, int(entry["frames"]))
        if mel.dtype != np.float32 or mel.shape != expected:
            raise UserError(f"cannot read features {path} (entry {entry.get('id')}): {mel.dtype} {mel.shape}, "
                            f"expected float32 {expected}; re-run prepare")
        return mel

    def packed(self, split: str, build: bool = False) -> Pack | None:
        """The split's pack when it matches the manifest; with `build`, a missing or stale one is written first
        (a store that cannot be written gets None and one note: the features are then read file by file)."""
        entries = self.split(split)
        if not entries:
            return None
        fingerprint = entries_fingerprint(entries)
        pack = read_pack(self.root, split, fingerprint, self.features.n_mels)
        if pack is None and build:
            try:
                write_pack(self, split)
            except OSError as err:
                print(f"note: cannot write {self.root / PACKED}: {err}; reading features file by file (slower)",
                      file=sys.stderr)
                return None
            pack = read_pack(self.root, split, fingerprint, self.features.n_mels)
        return pack

    def source_path(self, entry: dict[str, Any]) -> Path:
        """The audio file the entry's features were computed from (a relative path: below the store); a UserError
        names the entry when it is gone."""
        source = Path(entry["source"])
        if not source.is_absolute() and not source.exists():
            source = self.root / source
        if not source.is_file():
            raise UserError(f"source audio of '{entry['id']}' not found: {source} (this reads the corpus the "
                            f"features in {self.root} were prepared from)")
        return source

    def source_audio(self, entry: dict[str, Any]) -> np.ndarray:
        """The waveform the entry's features were computed from, read as `prepare` read it (its segment, down-mixed,
        resampled to the store's rate): float32 (samples,). A UserError names the entry when it is gone or bad."""
        source = self.source_path(entry)
        try:
            return load_audio(source, self.features, entry.get("offset") or 0.0, entry.get("duration"))
        except AudioError as err:
            raise UserError(f"source audio {source} of '{entry['id']}': {err}") from None


@dataclass(frozen=True)
class Pack:
    """One split's features in one array: packed/<split>.npy, float32 (total frames, n_mels).

    Args:
        path: the array file.
        rows: utterance id -> the array row of its first frame.
    """

    path: Path
    rows: dict[str, int]


def entries_fingerprint(entries: list[dict[str, Any]]) -> str:
    """A digest of manifest entries (every field, in order): a pack built from other entries is stale."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _pack_paths(root: Path, split: str) -> tuple[Path, Path]:
    """(array, index) files of a split's pack."""
    return root / PACKED / f"{split}.npy", root / PACKED / f"{split}.json"


def read_pack(root: Path, split: str, fingerprint: str, n_mels: int) -> Pack | None:
    """The split's pack when its index carries `fingerprint` and its array has the indexed shape, else None."""
    array_path, index_path = _pack_paths(root, split)
    try:
        index = json.loads(index_path.read_text())
        if index["fingerprint"] != fingerprint:
            return None
        array = np.load(array_path, mmap_mode="r")
        if array.dtype != np.float32 or array.shape != (sum(index["frames"]), n_mels):
            return None
        return Pack(array_path, dict(zip(index["ids"], index["offsets"])))
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return None


def write_pack(store: Store, split: str) -> None:
    """Concatenate the split's feature files into packed/<split>.npy (frame major), then write its index. Both are
    replaced by rename, so processes building the same pack at once (DDP ranks) all end with a whole one."""
    entries = store.split(split)
    array_path, index_path = _pack_paths(store.root, split)
    frames = [int(e["frames"]) for e in entries]
    offsets = np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(int).tolist()

    def fill(tmp: Path) -> None:
        shape = (sum(frames), store.features.n_mels)
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        for entry, first, count in zip(entries, offsets, frames):
            array[first:first + count] = store.load(entry, mmap=True).T
        array.flush()
        del array

    atomic_write(array_path, fill)
    index = {"fingerprint": entries_fingerprint(entries), "ids": [e["id"] for e in entries], "offsets": offsets,
             "frames": frames}
    _write_text(index_path, json.dumps(index))


def write_packs(store: Store) -> None:
    """Bring every split's pack up to date: written when missing or stale, removed for a split with no entries."""
    folder = store.root / PACKED
    splits = {e["split"] for e in store.entries} | {p.stem for p in folder.glob("*.json")}
    for split in sorted(splits):
        if not store.split(split):
            for path in _pack_paths(store.root, split):
                path.unlink(missing_ok=True)
        elif store.packed(split) is None:
            write_pack(store, split)


# ----------------------------------------------------------------------------------------------- reading

def open_store(root: str | Path) -> Store:
    """The prepared feature store at `root`; a UserError says how to make one (a folder of audio given instead gets
    a hint that names a separate output folder, never the corpus itself)."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        if _holds_audio(root):
            raise UserError(f"{root} holds audio, not prepared features: run `sqaudio prepare {root} "
                            f"FEATURES_DIR` (a new folder outside the corpus), then pass FEATURES_DIR")
        raise UserError(f"{root} has no {MANIFEST}: run `sqaudio prepare CORPUS {root}` first")
    entries = read_jsonl(manifest)
    features = from_dict(FeatureConfig, json.loads((root / FEATURE_CONFIG).read_text()), "features")
    speakers = json.loads((root / SPEAKERS).read_text())
    return Store(root, entries, features, speakers)


def _holds_audio(root: Path) -> bool:
    """Whether an audio file lies anywhere below `root` (a corpus rather than a store)."""
    return root.is_dir() and any(is_audio(path) and path.is_file() for path in root.rglob("*"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def saved_feature_config(root: Path) -> FeatureConfig | None:
    """The feature settings a store (finished or not) was prepared with; None for a new store."""
    path = root / FEATURE_CONFIG
    if not path.is_file():
        return None
    try:
        return from_dict(FeatureConfig, json.loads(path.read_text()), "features")
    except (ValueError, UserError):
        raise UserError(f"{path} is unreadable: delete {root} or choose another OUT_DIR") from None


def previous_entries(root: Path) -> dict[str, dict[str, Any]]:
    """Entries an earlier run left (its manifest, then its journal), by id; torn and junk lines are ignored."""
    rows = _read_jsonl_tolerant(root / MANIFEST) + _read_jsonl_tolerant(root / JOURNAL)
    return {str(row["id"]): row for row in rows if "id" in row}


def _read_jsonl_tolerant(path: Path) -> list[dict[str, Any]]:
    """JSON lines of a file; a torn last line (a killed writer) and junk lines are ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def has_feature(root: Path, entry: dict[str, Any], n_mels: int) -> bool:
    """Whether the entry's feature file holds a (n_mels, frames) float32 array."""
    try:
        array = np.load(root / entry["features"], mmap_mode="r")
        return array.dtype == np.float32 and array.shape == (n_mels, int(entry["frames"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------------------------- writing

def feature_path(split: str, speaker: str, utterance_id: str) -> str:
    """Store-relative path of an utterance's feature file."""
    return f"{FEATURES}/{split}/{speaker}/{utterance_id}.npy"


def write_feature(root: Path, relative: str, mel: np.ndarray) -> None:
    """Atomically write a feature file as float32 .npy."""
    save_npy(root / relative, np.ascontiguousarray(mel, dtype=np.float32))


def link_feature(source: Store, entry: dict[str, Any], root: Path) -> None:
    """Put the entry's feature file of `source` into the store at `root`: a hard link, or a copy across devices."""
    target = root / entry["features"]
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source.root / entry["features"], target)
    except OSError:
        atomic_write(target, lambda tmp: shutil.copyfile(source.root / entry["features"], tmp))


def _write_text(path: Path, text: str) -> None:
    """Atomically replace a text file of the store."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def feature_config_json(features: FeatureConfig) -> str:
    """The text of feature_config.json."""
    return json.dumps(to_dict(features), indent=2)


def write_feature_config(root: Path, features: FeatureConfig) -> None:
    """Record the feature settings (first, so that an unfinished store knows them)."""
    _write_text(root / FEATURE_CONFIG, feature_config_json(features))


class Journal:
    """The finished entries of a running `prepare`, one JSON line each, flushed as they come (a killed run resumes
    from them). Use as a context manager."""

    def __init__(self, root: Path):
        self.path = root / JOURNAL

    def __enter__(self) -> Journal:
        self._file = self.path.open("a")
        return self

    def add(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def __exit__(self, *exc) -> None:
        self._file.close()


def write_store(root: Path, entries: Iterable[dict[str, Any]], skipped: list[dict[str, Any]],
                features: FeatureConfig) -> Store:
    """Write skipped list, speakers, the packs and (last) the manifest, each atomically, and drop the journal. The
    speaker table holds the speakers with a training utterance. Returns the finished store."""
    rows = sorted(entries, key=lambda e: (e["split"], e["speaker"], e["id"]))
    speakers = sorted({e["speaker"] for e in rows if e["split"] == "train"})
    _write_text(root / SKIPPED, "".join(json.dumps(s) + "\n" for s in skipped))
    _write_text(root / SPEAKERS, json.dumps(speakers, indent=1) + "\n")
    store = Store(root, rows, features, speakers)
    write_packs(store)
    _write_text(root / MANIFEST, "".join(json.dumps(e) + "\n" for e in rows))
    (root / JOURNAL).unlink(missing_ok=True)
    return store


def remove_orphans(store: Store) -> int:
    """Delete feature files no manifest entry names (e.g. after the split settings changed) and stale temporaries
    (of packs too; the packs themselves are kept); returns how many."""
    keep = {e["features"] for e in store.entries}
    packed = store.root / PACKED
    removed = 0
    for path in packed.glob(".*.tmp") if packed.is_dir() else []:
        path.unlink()
        removed += 1
    features = store.root / FEATURES
    for path in features.rglob("*") if features.is_dir() else []:
        relative = path.relative_to(store.root).as_posix()
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_file() and (stale_tmp or (path.suffix == ".npy" and relative not in keep)):
            path.unlink()
            removed += 1
    return removed
