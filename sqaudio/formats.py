"""The one rule for which files are audio, shared by `prepare` (corpora) and `reconstruct`/`encode`.

A file is audio when its suffix (any case) is in AUDIO_SUFFIXES: formats libsndfile reads (soundfile >= 0.12
bundles libsndfile 1.2 with MP3). Audio files of a known format outside the list (.m4a ...) are *unsupported*
and skipped with a reason; every other file met while scanning a folder (text, hidden files) is *ignored*,
and counted so that the commands can say so.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf")
UNSUPPORTED_AUDIO = (".m4a", ".aac", ".wma", ".mp4", ".webm", ".amr", ".ape", ".wv", ".mka")
ACCEPTED = "/".join(AUDIO_SUFFIXES)


def is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_SUFFIXES


def is_hidden(path: Path, below: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(below).parts)


def unsupported_reason(path: Path) -> str | None:
    """A skip reason for an audio file in a format we do not read, else None."""
    if path.suffix.lower() in UNSUPPORTED_AUDIO and not path.name.startswith("."):
        return f"unsupported audio format {path.suffix.lower()}: convert it to one of {ACCEPTED}"
    return None


def scan(folder: Path, recursive: bool = False, accept: Callable[[Path], bool] = is_audio,
         companions: tuple[str, ...] = ()) -> tuple[list[Path], list[Path], Counter]:
    """(accepted files, unsupported audio files, ignored-file counts by kind) below `folder`, sorted.

    Hidden files and folders (e.g. macOS `._x.wav`) are ignored, counted as "hidden"; files with a
    `companions` suffix (the .json next to codes) are neither accepted nor counted."""
    accepted, unsupported, ignored = [], [], Counter()
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not path.is_file() or path.suffix.lower() in companions:
            continue
        if is_hidden(path, folder):
            ignored["hidden"] += 1
        elif accept(path):
            accepted.append(path)
        elif unsupported_reason(path):
            unsupported.append(path)
        else:
            ignored[path.suffix.lower() or "no suffix"] += 1
    return accepted, unsupported, ignored


def ignored_note(ignored: Counter, what: str = "audio") -> str:
    """One line about files left out because they are not `what` ('' when none)."""
    if not ignored:
        return ""
    kinds = ", ".join(f"{kind} x{n}" for kind, n in ignored.most_common(4)) + (", ..." if len(ignored) > 4 else "")
    accepted = f"; audio is {ACCEPTED}" if what == "audio" else ""
    return f"ignored {sum(ignored.values())} file(s) that are not {what} ({kinds}){accepted}"
