"""Code files: `npy` (int64 indices + a JSON header naming the model) and the ZeroSpeech 2019 export (one
codebook vector per latent frame, as text)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sqaudio.errors import UserError
from sqaudio.files import atomic_write, save_npy

FORMATS = ("npy", "zerospeech")


def fingerprint(model: torch.nn.Module) -> str:
    """Short id of a trained model: a hash of its codebook (codes are only meaningful with it)."""
    book = model.quantizer.lookup(torch.arange(model.recipe.quantizer.codebook_size)[None].to(
        next(model.parameters()).device))
    return hashlib.sha1(book.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]


def code_files(path: Path, fmt: str) -> list[Path]:
    """The files `write_codes` writes for codes at `path` (<name>.npy): npy + json header, or zerospeech .txt."""
    if fmt == "zerospeech":
        return [path.with_suffix(".txt")]
    if fmt != "npy":
        raise UserError(f"unknown codes format '{fmt}' (valid: {', '.join(FORMATS)})")
    return [path.with_suffix(".npy"), path.with_suffix(".json")]


def write_codes(path: Path, codec, enc, fmt: str) -> list[Path]:
    """`npy`: <path>.npy + <path>.json (`codec.header`); `zerospeech`: <path>.txt, one codebook vector per latent
    frame. `codec` is the `Codec` that made `enc` (its `Encoded`)."""
    files = code_files(path, fmt)
    if fmt == "zerospeech":
        indices = torch.from_numpy(enc.codes)[None].to(codec.device)
        vectors = codec.model.quantizer.lookup(indices)[0].T.detach().cpu().numpy()  # (T', D)
        atomic_write(files[0], lambda tmp: np.savetxt(tmp, vectors, fmt="%.6f"))
        return files
    save_npy(files[0], enc.codes)
    atomic_write(files[1], lambda tmp: tmp.write_text(json.dumps(codec.header(enc), indent=2)))
    return files


def read_codes(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(int64 codes (T',), header) of an `npy` code file and its JSON header."""
    header_path = path.with_suffix(".json")
    try:
        codes = np.load(path)
        header = json.loads(header_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read codes {path} with header {header_path.name}: {err}") from None
    return codes.astype(np.int64), header
