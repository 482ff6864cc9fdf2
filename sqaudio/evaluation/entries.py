"""Which utterances of a feature store a speech model is evaluated on: a split, or an evaluation list."""
from __future__ import annotations

import json
from pathlib import Path

from sqaudio.config import FeatureConfig, feature_mismatch
from sqaudio.errors import UserError


def read_eval_list(path: str | Path) -> list[tuple[str, str]]:
    """Evaluation list of the reference code: [[path_without_ext, speaker], ...]."""
    try:
        items = json.loads(Path(path).read_text())
        return [(str(p), str(s)) for p, s in items]
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot read evaluation list {path}: expected [[path, speaker], ...] ({err})") from None


def select_entries(entries: list[dict], eval_list: list[tuple[str, str]]) -> list[dict]:
    """Manifest entries whose source (without extension) ends with a listed path."""
    by_stem = {str(Path(e["source"]).with_suffix("")).replace("\\", "/"): e for e in entries}
    chosen = []
    for path, _speaker in eval_list:
        match = [e for stem, e in by_stem.items() if stem.endswith(path.strip("/"))]
        if not match:
            raise UserError(f"evaluation list entry '{path}' is not in the prepared data")
        chosen.append(match[0])
    return chosen


def speech_entries(store, features: FeatureConfig, speakers: list[str], split: str = "test",
                   eval_list: str | None = None) -> tuple[list[dict], list[str]]:
    """The utterances of `store` a model is evaluated on (split or list, known speakers, >= 8 frames) and the
    unknown speakers left out; a UserError when the model's features differ from the store's or nothing is left."""
    diff = feature_mismatch(features, store.features, ("model", "data"))
    if diff:
        raise UserError(f"model features do not match the prepared data in {store.root}: {'; '.join(diff)}")
    entries = select_entries(store.entries, read_eval_list(eval_list)) if eval_list else store.split(split)
    known = set(speakers)
    unknown = sorted({e["speaker"] for e in entries} - known)
    entries = [e for e in entries if e["speaker"] in known and e["frames"] >= 8]
    if not entries:
        raise UserError(f"no utterances to evaluate in split '{split}' of {store.root} with a speaker the model knows")
    return entries, unknown
