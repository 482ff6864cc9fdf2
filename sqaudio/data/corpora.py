"""Corpus layouts on disk -> utterance lists with speakers and train/test splits.

Layouts (see docs/data.md):
  vctk            VCTK 0.80 `wav48/<spk>/<spk>_<n>.wav`,
                  or VCTK 0.92 `wav48_silence_trimmed/<spk>/<spk>_<n>_mic{1,2}.flac`
  zerospeech2019  `<lang>/train/{unit,voice,parallel/source,parallel/voice}/*.wav` (train), `<lang>/test/*.wav` (test);
                  speaker = file-name prefix before the first `_`
  folder          `<root>/<speaker>/**/*.<audio>`

Audio is what `sqaudio.files` accepts (one rule for every command); unsupported audio formats are skipped
with a reason, other files (text, hidden) are counted in `Listing.ignored`.
  split files     the reference's JSON `[[in_path, offset_s, duration_s, out_path], ...]` (or the same rows as CSV)
                  and evaluation lists `[[path_without_ext, speaker], ...]`

VCTK and folder corpora get a held-out test split per speaker: an utterance is a test utterance when a hash of
(seed, speaker, id) falls below `test_fraction`, so adding files never moves other utterances between splits.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from sqaudio.errors import UserError
from sqaudio.files import ACCEPTED, AUDIO_SUFFIXES, ignored_note, scan, unsupported_reason

SPLITS = ("train", "test")
VCTK_092, VCTK_080 = "wav48_silence_trimmed", "wav48"
ZEROSPEECH_TRAIN = ("unit", "voice", "parallel/source", "parallel/voice")
MIC_NAME = re.compile(r"^(?P<utt>.+)_mic(?P<mic>\d+)$")


@dataclass(frozen=True)
class Utterance:
    """One utterance to prepare.

    Args:
        id: unique name in the store (the feature file is `features/<split>/<speaker>/<id>.npy`).
        speaker: speaker id.
        path: the audio file.
        split: "train" or "test".
        offset: start of the segment in seconds.
        duration: segment length in seconds (None: to the end of the file).
    """

    id: str
    speaker: str
    path: Path
    split: str
    offset: float = 0.0
    duration: float | None = None


@dataclass
class Listing:
    """What a corpus holds.

    Args:
        layout: the layout that was read, e.g. "VCTK 0.92 (mic1)".
        root: the folder the layout was found in.
        utterances: the utterances, sorted by (speaker, id).
        skipped: files left out before any audio is read: {"source", "reason"}.
        ignored: files that are not audio, counted by suffix (or "hidden").
    """

    layout: str
    root: Path
    utterances: list[Utterance]
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)

    def note(self) -> str:
        """One line about ignored files, '' when none."""
        return ignored_note(self.ignored)


# ----------------------------------------------------------------------------------------------- helpers

class _Scanner:
    """Lists audio files the `sqaudio.files` way and remembers what it left out (skipped, ignored)."""

    def __init__(self):
        self.skipped: list[dict[str, str]] = []
        self.ignored: Counter = Counter()

    def audio(self, folder: Path, recursive: bool = False) -> list[Path]:
        audio, unsupported, ignored = scan(folder, recursive)
        self.skipped += [{"source": str(p), "reason": unsupported_reason(p)} for p in unsupported]
        self.ignored.update(ignored)
        return audio


def _audio_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Audio files below `folder`, sorted (what is left out is not recorded)."""
    return scan(folder, recursive)[0]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def unit_hash(*parts: str) -> float:
    """A stable number in [0, 1) from strings (sha256; independent of Python's hash seed)."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def held_out_split(pairs: Iterable[tuple[str, str]], test_fraction: float, seed: int = 0) -> dict[str, str]:
    """Deterministic per-speaker train/test split of (speaker, id) pairs -> {id: split}.

    An utterance is "test" when unit_hash(seed, speaker, id) < test_fraction. When that would leave a speaker
    without training data (and test_fraction < 1), the speaker's utterance with the largest hash stays in train.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise UserError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    by_speaker: dict[str, dict[str, float]] = defaultdict(dict)
    for speaker, utt in pairs:
        by_speaker[speaker][utt] = unit_hash(str(seed), speaker, utt)
    splits = {}
    for scores in by_speaker.values():
        test = {u for u, h in scores.items() if h < test_fraction}
        if test_fraction < 1.0 and len(test) == len(scores):
            test.discard(max(scores, key=scores.get))
        splits.update({u: "test" if u in test else "train" for u in scores})
    return splits


def _finish(layout: str, root: Path, utts: list[Utterance], skipped: list[dict[str, str]],
            scanner: _Scanner | None = None) -> Listing:
    """Sort, drop duplicate ids (first path wins; the same file listed twice is merged silently), check non-empty."""
    chosen: dict[str, Utterance] = {}
    for utt in sorted(utts, key=lambda u: (u.speaker, u.id, str(u.path))):
        first = chosen.get(utt.id)
        if first is None:
            chosen[utt.id] = utt
        elif (first.path, first.offset, first.duration) != (utt.path, utt.offset, utt.duration):
            skipped.append({"source": str(utt.path),
                            "reason": f"duplicate utterance id '{utt.id}' (kept {first.path})"})
    if scanner is not None:
        skipped += scanner.skipped
    ignored = scanner.ignored if scanner is not None else Counter()
    if not chosen:
        first_skip = f"{skipped[0]['source']}: {skipped[0]['reason']}" if skipped else ""
        why = f"; {len(skipped)} file(s) skipped, e.g. {first_skip}" if skipped else ""
        note = f"; {ignored_note(ignored)}" if ignored else ""
        raise UserError(f"no usable audio found in {root} (layout: {layout}){why}{note}")
    return Listing(layout, root, sorted(chosen.values(), key=lambda u: (u.speaker, u.id)), skipped, ignored)


# ----------------------------------------------------------------------------------------------- layouts

def list_vctk(root: Path, mic: int = 1, test_fraction: float = 0.05, seed: int = 0) -> Listing:
    """VCTK 0.92 (`wav48_silence_trimmed`, one mic chosen) or 0.80 (`wav48`) under `root`."""
    if mic not in (1, 2):
        raise UserError(f"--mic must be 1 or 2, got {mic}")
    scanner = _Scanner()
    if (root / VCTK_092).is_dir():
        layout, found, skipped = f"VCTK 0.92 ({VCTK_092}/, mic{mic})", *_vctk_092(root / VCTK_092, mic, scanner)
    elif (root / VCTK_080).is_dir():
        layout, skipped = f"VCTK 0.80 ({VCTK_080}/)", []
        found = [(d.name, p.stem, p) for d in _subdirs(root / VCTK_080) for p in scanner.audio(d)]
    else:
        raise UserError(f"{root} is not a VCTK corpus: expected {VCTK_092}/ (0.92) or {VCTK_080}/ (0.80)")
    splits = held_out_split(((spk, utt) for spk, utt, _ in found), test_fraction, seed)
    utts = [Utterance(utt, spk, path, splits[utt]) for spk, utt, path in found]
    return _finish(layout, root, utts, skipped, scanner)


def _vctk_092(audio_root: Path, mic: int, scanner: _Scanner) -> tuple[list[tuple[str, str, Path]], list[dict[str, str]]]:
    found, skipped = [], []
    for spk_dir in _subdirs(audio_root):
        by_utt: dict[str, dict[int, Path]] = defaultdict(dict)
        for path in scanner.audio(spk_dir):
            match = MIC_NAME.match(path.stem)
            if match is None:
                skipped.append({"source": str(path),
                                "reason": "unrecognised VCTK 0.92 file name (expected <spk>_<n>_mic1|2)"})
                continue
            by_utt[match["utt"]][int(match["mic"])] = path
        for utt, mics in sorted(by_utt.items()):
            if mic in mics:
                found.append((spk_dir.name, utt, mics[mic]))
            else:
                other = next(iter(mics.values()))
                skipped.append({"source": str(other.with_name(f"{utt}_mic{mic}{other.suffix}")),
                                "reason": f"no mic{mic} recording"})
    return found, skipped


def list_zerospeech(root: Path) -> Listing:
    """ZeroSpeech 2019: every `<lang>/` with train/ or test/ (or `root` itself when it is a language folder)."""
    langs = [root] if _is_zerospeech_lang(root) else [d for d in _subdirs(root) if _is_zerospeech_lang(d)]
    if not langs:
        raise UserError(f"{root} is not a ZeroSpeech 2019 corpus: expected english/train/unit/ ... and english/test/")
    utts, skipped, scanner = [], [], _Scanner()
    for lang in langs:
        sources = [("train", lang / "train" / sub) for sub in ZEROSPEECH_TRAIN] + [("test", lang / "test")]
        for split, folder in sources:
            for path in scanner.audio(folder) if folder.is_dir() else []:
                speaker, sep, _ = path.stem.partition("_")
                if not sep or not speaker:
                    skipped.append({"source": str(path),
                                    "reason": "no speaker prefix in the file name (expected SPK_id)"})
                    continue
                utts.append(Utterance(path.stem, speaker, path, split))
    names = ", ".join(d.name for d in langs)
    return _finish(f"ZeroSpeech 2019 ({names})", root, utts, skipped, scanner)


def _is_zerospeech_lang(folder: Path) -> bool:
    return any((folder / "train" / sub).is_dir() for sub in ZEROSPEECH_TRAIN) or (
        (folder / "test").is_dir() and (folder / "train").is_dir())


def list_folder(root: Path, test_fraction: float = 0.05, seed: int = 0) -> Listing:
    """`<root>/<speaker>/**/*.<audio>`; id = `<speaker>_<path below the speaker folder>` ('/' -> '__')."""
    scanner = _Scanner()
    skipped = [{"source": str(p), "reason": "audio directly in the corpus root (put it in a <speaker>/ folder)"}
               for p in scanner.audio(root)]
    found = []
    for spk_dir in _subdirs(root):
        for path in scanner.audio(spk_dir, recursive=True):
            utt = "__".join(path.relative_to(spk_dir).with_suffix("").parts)
            found.append((spk_dir.name, utt if utt.startswith(spk_dir.name) else f"{spk_dir.name}_{utt}", path))
    splits = held_out_split(((spk, utt) for spk, utt, _ in found), test_fraction, seed)
    return _finish("folder (<speaker>/**/<audio file>)", root,
                   [Utterance(u, s, p, splits[u]) for s, u, p in found], skipped, scanner)


# ----------------------------------------------------------------------------------------------- split files

def read_split_files(paths: list[Path], corpus_root: Path) -> Listing:
    """Reference split files and/or evaluation lists; audio paths are relative to `corpus_root`, no extension."""
    utts, skipped = [], []
    for path in paths:
        rows = _read_rows(Path(path))
        for i, row in enumerate(rows):
            where = f"{path} entry {i}"
            if isinstance(row, list) and len(row) == 4:
                utt = _split_entry(row, Path(path), corpus_root, where)
            elif isinstance(row, list) and len(row) == 2:
                utt = _eval_entry(row, corpus_root, where)
            else:
                raise UserError(f"{where}: expected [in_path, offset, duration, out_path] or [path, speaker], "
                                f"got {row!r}")
            if isinstance(utt, dict):
                skipped.append(utt)
            else:
                utts.append(utt)
    names = ", ".join(Path(p).name for p in paths)
    return _finish(f"split file(s) {names}", corpus_root, utts, skipped)


def _read_rows(path: Path) -> list:
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as f:
                return [[r[0], float(r[1]), float(r[2]) if r[2] not in ("", "None") else None, r[3]]
                        for r in csv.reader(f) if r]
        rows = json.loads(path.read_text())
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read split file {path}: {err}") from None
    if not isinstance(rows, list):
        raise UserError(f"split file {path} must hold a JSON list of entries")
    return rows


def _find_audio(corpus_root: Path, rel: str) -> Path | None:
    base = corpus_root / rel
    if base.suffix.lower() in AUDIO_SUFFIXES and base.is_file():
        return base
    return next((p for ext in AUDIO_SUFFIXES if (p := base.with_name(base.name + ext)).is_file()), None)


def _split_entry(row: list, path: Path, corpus_root: Path, where: str) -> Utterance | dict[str, str]:
    in_path, offset, duration, out_path = row
    def seconds(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0

    if not (isinstance(in_path, str) and isinstance(out_path, str) and seconds(offset)
            and (duration is None or seconds(duration)) and Path(out_path).parent.name):
        raise UserError(f"{where}: expected [in_path, offset_s, duration_s, '<...>/<speaker>/<id>'], got {row!r}")
    audio = _find_audio(corpus_root, in_path)
    if audio is None:
        return {"source": str(corpus_root / in_path), "reason": f"missing audio file ({ACCEPTED})"}
    parts = Path(out_path).parts
    split = "test" if "test" in parts else "train" if "train" in parts else (
        "test" if "test" in path.stem.lower() else "train")
    out = Path(out_path)
    return Utterance(out.name, out.parent.name, audio, split, float(offset),
                     None if duration is None else float(duration))


def _eval_entry(row: list, corpus_root: Path, where: str) -> Utterance | dict[str, str]:
    rel, speaker = row
    if not (isinstance(rel, str) and isinstance(speaker, str) and speaker):
        raise UserError(f"{where}: expected [path_without_ext, speaker], got {row!r}")
    audio = _find_audio(corpus_root, rel)
    if audio is None:
        return {"source": str(corpus_root / rel), "reason": f"missing audio file ({ACCEPTED})"}
    return Utterance(Path(rel).name, speaker, audio, "test")


# ----------------------------------------------------------------------------------------------- detection

LAYOUTS: dict[str, Callable[..., Listing]] = {
    "vctk": lambda root, mic, fraction, seed: list_vctk(root, mic, fraction, seed),
    "zerospeech2019": lambda root, mic, fraction, seed: list_zerospeech(root),
    "folder": lambda root, mic, fraction, seed: list_folder(root, fraction, seed),
}


def detect_layout(root: Path) -> tuple[str, Path]:
    """(layout name, folder holding it). Looks at `root`, then at its only sub-folder holding VCTK or ZeroSpeech
    (an unpacked archive folder such as VCTK-Corpus-0.92/ or 2019/), then for <speaker>/ folders with audio."""
    if name := _known_layout(root):
        return name, root
    inner = [(name, d) for d in _subdirs(root) if (name := _known_layout(d))]
    if len(inner) == 1:
        return inner[0]
    if inner:
        found = ", ".join(f"{d.name}/ ({name})" for name, d in inner)
        raise UserError(f"{root} holds several corpora: {found}; give one of them as CORPUS_DIR")
    if any(_audio_files(d, recursive=True) for d in _subdirs(root)):
        return "folder", root
    raise UserError(f"cannot recognise the corpus layout of {root}: expected VCTK ({VCTK_092}/ or {VCTK_080}/), "
                    f"ZeroSpeech 2019 (english/train/, english/test/) or <speaker>/ folders of {ACCEPTED}")


def _known_layout(folder: Path) -> str | None:
    if (folder / VCTK_092).is_dir() or (folder / VCTK_080).is_dir():
        return "vctk"
    if _is_zerospeech_lang(folder) or any(_is_zerospeech_lang(d) for d in _subdirs(folder)):
        return "zerospeech2019"
    return None


def list_corpus(root: str | Path, corpus: str = "auto", mic: int = 1, test_fraction: float = 0.05, seed: int = 0,
                split_files: list[Path] | None = None) -> Listing:
    """The utterances of a corpus: from split files when given, else from the (detected) layout.

    Args:
        root: the corpus folder (split-file paths are relative to it).
        corpus: "auto" or a key of LAYOUTS.
        mic: VCTK 0.92 microphone (1 or 2).
        test_fraction, seed: held-out split of VCTK and folder corpora (see held_out_split).
        split_files: reference split files / evaluation lists; they replace the layout's own listing.
    """
    root = Path(root).absolute()  # manifest sources must not depend on the working directory
    if not root.is_dir():
        raise UserError(f"corpus folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    if split_files:
        return read_split_files([Path(p) for p in split_files], root)
    if corpus != "auto" and corpus not in LAYOUTS:
        raise UserError(f"unknown corpus layout '{corpus}' (choose auto, {', '.join(LAYOUTS)})")
    where = root
    if corpus == "auto":
        corpus, where = detect_layout(root)
    return LAYOUTS[corpus](where, mic, test_fraction, seed)
