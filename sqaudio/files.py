"""Files on disk, one rule each: atomic writes, which files are audio, where per-input outputs go.

Writes: every output (checkpoints, features, wavs, codes, plots, JSON) is written to a temporary file in its
folder and renamed into place, so a crash never leaves a half-written file.

Audio: a file is audio when its suffix (any case) is in AUDIO_SUFFIXES: formats libsndfile reads (soundfile >=
0.12 bundles libsndfile 1.2 with MP3). Audio files of a known format outside the list (.m4a ...) are
*unsupported* and skipped with a reason; every other file met while scanning a folder (text, hidden files) is
*ignored*, and counted so that the commands can say so. `prepare` (corpora) and `reconstruct`/`encode` share it.

Outputs of `reconstruct`, `encode`, `decode` and their plots:
- Inputs are files or folders; folders are searched recursively for accepted files, and the other files met
  there are counted (`Inputs.ignored`) so the command can say so.
- Every input keeps its path relative to the deepest folder holding all inputs (a folder argument counts as
  itself, a file argument as its parent): `in/a/x.flac` and `in/b/x.flac` become `OUT/a/x.wav` and
  `OUT/b/x.wav`.
- `-o NAME.wav` (the command's own file type) names the output of a single input; with several inputs it is
  refused, as is a file name of another known type.
- Outputs that would collide, or that exist already without `--overwrite`, are refused in one line before
  anything is written.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqaudio.errors import UserError

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


FILE_TYPES = set(AUDIO_SUFFIXES) | {".png", ".pdf", ".svg", ".npy", ".json", ".txt", ".pt"}


@dataclass
class Inputs:
    """Input files in order, their paths relative to the common base, and what was left out of folders."""

    files: list[Path]
    relative: list[Path]
    ignored: Counter
    what: str = "audio"

    def note(self) -> str:
        return ignored_note(self.ignored, self.what)


def find_inputs(paths: list[Path], accept: Callable[[Path], bool] = is_audio, companions: tuple[str, ...] = (),
                what: str = "audio") -> Inputs:
    """Files, and the accepted files inside folders (recursive, sorted; the audio rule above). Unsupported
    audio formats are refused when named and counted when met in a folder, like any other file left out."""
    files, ignored = [], Counter()
    for path in paths:
        if path.is_dir():
            found, unsupported, left_out = scan(path, True, accept, companions)
            files += found
            ignored.update(left_out)
            ignored.update(f"{p.suffix.lower()} (unsupported audio)" for p in unsupported)
        elif path.is_file():
            if why := unsupported_reason(path):
                raise UserError(f"{path}: {why}")
            files.append(path)
        else:
            raise UserError(f"input not found: {path}")
    files = list(dict.fromkeys(files))  # the same file named twice is one input
    if not files:
        note = f"; {ignored_note(ignored, what)}" if ignored else ""
        raise UserError(f"no input files in {', '.join(map(str, paths))}{note}")
    roots = [str(p.absolute() if p.is_dir() else p.absolute().parent) for p in paths]
    base = Path(os.path.commonpath(roots))
    return Inputs(files, [f.absolute().relative_to(base) for f in files], ignored, what)


def targets(inputs: Inputs, output: Path, suffix: str, flag: str = "-o", file_ok: bool = True) -> list[Path]:
    """Output path of every input: `output` itself (a `suffix` file, one input) or `output`/<relative>.<suffix>."""
    kind = output.suffix.lower()
    if kind == suffix and file_ok and not output.is_dir():
        if len(inputs.files) > 1:
            raise UserError(f"{flag} {output} names one {suffix} file, but {len(inputs.files)} inputs were given: "
                            "give a folder")
        return [output]
    if kind in FILE_TYPES and not output.is_dir():
        wanted = f"a {suffix} file (one input) or a folder" if file_ok else "a folder"
        raise UserError(f"{flag} {output} looks like a {kind} file; expected {wanted}")
    out = [output / rel.with_suffix(suffix) for rel in inputs.relative]
    seen: dict[Path, Path] = {}
    for target, source in zip(out, inputs.files):
        if target in seen:
            raise UserError(f"{seen[target]} and {source} would both be written to {target}; "
                            "rename one or run them separately")
        seen[target] = source
    return out


def check_free(paths: list[Path], overwrite: bool) -> None:
    """Refuse (one line) when any output exists already, unless `overwrite`."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} exists{more}: pass --overwrite to replace, or choose another output")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result onto `path` in one rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the mode open() would give them
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npy(path: Path, array) -> None:
    """Write a numpy array as .npy atomically (through a file handle: np.save on a path would append ".npy" to the
    temporary file's name)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)
