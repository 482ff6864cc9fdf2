"""ABX item files (the ZeroSpeech / Libri-light `.item` format), the audio they name, and which code frames each
item covers.

An item file holds one phone token per line, after an optional header line starting with `#`:

    #file onset offset #phone prev-phone next-phone speaker
    S002_0379088085 0.4725 0.5925 AH L N S002

`file` is the audio file's name without extension, `onset` and `offset` are seconds. The context of an item is
(prev-phone, next-phone). See docs/abx.md for the frame selection rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sqaudio.errors import UserError
from sqaudio.files import scan

COLUMNS = "#file onset offset #phone prev-phone next-phone speaker"
TOLERANCE = 1e-6  # frames: an onset or offset this close to a frame centre counts as on it (float rounding)


@dataclass
class Items:
    """The items of one item file, as parallel arrays (one entry per item) plus the names the ids stand for.

    Args:
        file, phone, context, speaker: int ids into `files`, `phones`, `contexts`, `speakers`.
        onset, offset: seconds; line: the item's line in the file (1-based, for messages).
    """

    path: Path
    files: list[str]
    phones: list[str]
    contexts: list[tuple[str, str]]
    speakers: list[str]
    file: np.ndarray
    onset: np.ndarray
    offset: np.ndarray
    phone: np.ndarray
    context: np.ndarray
    speaker: np.ndarray
    line: np.ndarray

    def __len__(self) -> int:
        return len(self.file)


class _Ids(dict):
    """Names -> ids in first-seen order."""

    def id(self, name) -> int:
        return self.setdefault(name, len(self))


def read_items(path: Path) -> Items:
    """Parse an item file; a UserError names the file and line of the first bad line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read item file {path}: {err}") from None
    ids = {name: _Ids() for name in ("file", "phone", "context", "speaker")}
    rows, header_allowed = [], True
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        if header_allowed and fields[0].startswith("#"):
            header_allowed = False
            continue
        header_allowed = False
        onset, offset = _item_times(fields, f"{path}:{number}")
        rows.append((ids["file"].id(fields[0]), onset, offset, ids["phone"].id(fields[3]),
                     ids["context"].id((fields[4], fields[5])), ids["speaker"].id(fields[6]), number))
    if not rows:
        raise UserError(f"{path}: no items (expected lines of: {COLUMNS})")
    columns = list(zip(*rows))
    ints = [np.array(c, dtype=np.int64) for c in columns]
    return Items(path, list(ids["file"]), list(ids["phone"]), list(ids["context"]), list(ids["speaker"]),
                 ints[0], np.array(columns[1]), np.array(columns[2]), ints[3], ints[4], ints[5], ints[6])


def _item_times(fields: list[str], where: str) -> tuple[float, float]:
    """(onset, offset) of one split item line; a UserError starting with `where` (file:line) says what is wrong."""
    if len(fields) != 7:
        raise UserError(f"{where}: expected 7 columns ({COLUMNS}), got {len(fields)}")
    try:
        onset, offset = float(fields[1]), float(fields[2])
    except ValueError:
        raise UserError(f"{where}: onset and offset must be numbers (seconds), got {fields[1]!r} {fields[2]!r}") from None
    if not (math.isfinite(onset) and math.isfinite(offset) and 0 <= onset < offset):
        raise UserError(f"{where}: need 0 <= onset < offset (seconds), got {fields[1]} {fields[2]}")
    return onset, offset


def check_contexts(items: Items) -> None:
    """A UserError when no context holds two different phones (no ABX triplet can be formed)."""
    pairs = np.unique(np.stack([items.context, items.phone]), axis=1)
    if np.bincount(pairs[0]).max() < 2:
        raise UserError(f"{items.path}: no context (prev-phone, next-phone) holds 2 different phones, so no ABX "
                        "triplet can be formed")


def find_audio(names: list[str], folder: Path, source: Path) -> list[Path]:
    """The audio file of each name (a file name without extension) below `folder`; a UserError lists the names
    `source` (the item or bitrate list) gives with no audio, or with two audio files."""
    if not Path(folder).is_dir():
        raise UserError(f"--wavs {folder}: not a folder")
    found: dict[str, list[Path]] = {}
    for audio in scan(Path(folder), recursive=True)[0]:
        found.setdefault(audio.stem, []).append(audio)
    missing = [n for n in names if n not in found]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{source} names {len(missing)} file(s) with no audio in {folder}: "
                        f"{', '.join(missing[:3])}{more}")
    twice = next((n for n in names if len(found[n]) > 1), None)
    if twice is not None:
        raise UserError(f"{source} names {twice}, which matches {len(found[twice])} audio files in {folder}: "
                        f"{', '.join(str(p) for p in found[twice][:2])}")
    return [found[n][0] for n in names]


def frame_spans(items: Items, frames: np.ndarray, rate: float, first: float) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) code frames of each item (stop exclusive) for files of `frames[file]` frames, frame i centred
    at `first + i / rate` seconds: the frames whose centres lie in [onset, offset], or, when none does, the one
    nearest the item's middle. A UserError names the first item starting past the end of its file."""
    n = frames[items.file]
    late = items.onset > first + (n - 0.5) / rate
    if late.any():
        i = int(np.argmax(late))
        raise UserError(f"{items.path}:{items.line[i]}: onset {items.onset[i]} s is past the end of "
                        f"{items.files[items.file[i]]} ({n[i]} frames of {1 / rate:g} s)")
    start = np.ceil((items.onset - first) * rate - TOLERANCE).astype(np.int64)
    end = np.floor((items.offset - first) * rate + TOLERANCE).astype(np.int64)
    nearest = np.rint(((items.onset + items.offset) / 2 - first) * rate).astype(np.int64)
    empty = end < start
    start, end = np.where(empty, nearest, start), np.where(empty, nearest, end)
    start, end = np.clip(start, 0, n - 1), np.clip(end, 0, n - 1)
    return start, end + 1


def code_timing(features) -> tuple[float, float]:
    """(code frames per second, centre of code frame 0 in seconds) of the speech SQ-VAE on `features`: log-mel
    frame j is centred at j hops (centred STFT); the encoder's k3 unpadded conv centres its output i on mel frame
    i + 1 and its k4 stride-2 pad-1 conv centres code t on that layer's 2t + 1/2, so code t is centred on mel frame
    2t + 3/2, i.e. at (t + 3/4) / rate (the frames its decoder predicts, 2t + 1 and 2t + 2, straddle it too)."""
    hop_s = features.hop_length / features.sample_rate
    return 1.0 / (2 * hop_s), 1.5 * hop_s


def read_bitrate_list(path: Path) -> list[tuple[str, float]]:
    """(file name without extension, seconds) per line of a ZeroSpeech 2019 bitrate list (`name.txt seconds`);
    a UserError names the file and line of the first bad line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read bitrate list {path}: {err}") from None
    rows = []
    for number, raw in enumerate(lines, 1):
        fields = raw.split()
        if not fields:
            continue
        try:
            seconds = float(fields[1]) if len(fields) == 2 else math.nan
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise UserError(f"{path}:{number}: expected 'file seconds' with seconds > 0, got {raw.strip()!r}")
        rows.append((fields[0].removesuffix(".txt"), seconds))
    if not rows:
        raise UserError(f"{path}: no files listed")
    return rows
