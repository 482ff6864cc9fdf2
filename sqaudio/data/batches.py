"""Training batches as a pure function of (seed, step): exact resume and per-rank slices come for free.

`StepBatches[step]` is the whole batch of that step. Items are drawn from an endless stream of seeded epoch
permutations (crop mode, images) or of shuffled length buckets (whole-utterance mode).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sqaudio.config import DataConfig
from sqaudio.errors import UserError


class FeatureSource(Protocol):
    """What batches read of a feature store (`sqaudio.data.store.Store`): its folder and its manifest entries.
    Named here, not imported, so that loading batches does not load the store's reader and writer."""

    root: Path

    def split(self, name: str) -> list[dict[str, Any]]: ...


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A torch RNG determined by the seed and integer keys (step, epoch, ...)."""
    mixed = seed
    for k in keys:
        mixed = (mixed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


class SpeechItems:
    """Utterances of one split; `item(i, g, frames)` returns a crop of `frames` frames (or the whole).

    Args:
        store: the prepared feature store.
        entries: manifest entries to use.
        speakers: speaker table (index = embedding row).
    """

    def __init__(self, store: FeatureSource, entries: list[dict[str, Any]], speakers: list[str]):
        self.store, self.entries = store, entries
        self.index = {s: i for i, s in enumerate(speakers)}

    def __len__(self) -> int:
        return len(self.entries)

    def item(self, i: int, g: torch.Generator | None = None, frames: int | None = None) -> dict[str, Tensor]:
        entry = self.entries[i]
        path = self.store.root / entry["features"]
        try:
            mel = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"cannot read features {path} (entry {entry.get('id')}): {err}; re-run prepare") from None
        total = mel.shape[-1]
        if frames is not None and total > frames:
            # the reference draws start in [0, total - frames - 1]
            start = int(torch.randint(0, total - frames, (1,), generator=g)) if g is not None else 0
            mel = mel[:, start:start + frames]
        return {"mel": torch.from_numpy(np.array(mel, dtype=np.float32)),
                "speaker": torch.tensor(self.index[entry["speaker"]])}


def collate_speech(items: list[dict[str, Tensor]], with_lengths: bool) -> dict[str, Tensor]:
    """Pad mels to the longest (zeros); lengths are included for whole-utterance batches."""
    lengths = torch.tensor([item["mel"].shape[-1] for item in items])
    mel = torch.zeros(len(items), items[0]["mel"].shape[0], int(lengths.max()))
    for row, item in zip(mel, items):
        row[:, : item["mel"].shape[-1]] = item["mel"]
    batch = {"mel": mel, "speaker": torch.stack([item["speaker"] for item in items])}
    if with_lengths:
        batch["lengths"] = lengths
    return batch


def collate_images(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class StepBatches(Dataset):
    """Map-style dataset whose index is the training step and whose item is that step's batch.

    Args:
        n_items: size of the underlying item set.
        batch_size: global batch size.
        seed: data seed.
        fetch: fetch([(item index, its own RNG), ...]) -> batch dict.
        buckets: optional list of index lists (whole-utterance mode); batches are shuffled buckets.
        rank, world: this process's slice of every global batch.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, fetch: Callable, buckets=None,
                 rank: int = 0, world: int = 1):
        self.n_items, self.batch_size, self.seed, self.fetch = n_items, batch_size, seed, fetch
        self.buckets, self.rank, self.world = buckets, rank, world

    @property
    def steps_per_epoch(self) -> int:
        return len(self.buckets) if self.buckets else max(1, self.n_items // self.batch_size)

    def indices(self, step: int) -> list[int]:
        if self.buckets:
            epoch, pos = divmod(step, len(self.buckets))
            order = torch.randperm(len(self.buckets), generator=step_generator(self.seed, 1, epoch))
            return list(self.buckets[int(order[pos])])
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, self.n_items)
            out.append(int(_permutation(self.n_items, self.seed, epoch)[pos]))
        return out

    def global_size(self, step: int) -> int:
        """Items in step's global batch (utterance buckets differ in size)."""
        return len(self.indices(step)) if self.buckets else self.batch_size

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        positions = list(enumerate(self.indices(step)))[self.rank::self.world]
        return self.fetch([(i, step_generator(self.seed, 2, step, pos)) for pos, i in positions])


_PERM_CACHE: dict[tuple[int, int, int], Tensor] = {}


def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=step_generator(seed, 0, epoch))
    return _PERM_CACHE[key]


def length_buckets(lengths: list[int], max_items: int, max_frames: int) -> list[list[int]]:
    """Group indices of similar length: sorted by length, at most max_items and max_frames padded frames."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets, current = [], []
    for i in order:
        longest = min(lengths[i], max_frames)
        if current and (len(current) >= max_items or longest * (len(current) + 1) > max_frames * max_items):
            buckets.append(current)
            current = []
        current.append(i)
    if current:
        buckets.append(current)
    return buckets


def speech_batches(store: FeatureSource, cfg: DataConfig, speakers: list[str], seed: int,
                   rank: int = 0, world: int = 1) -> StepBatches:
    """Training batches of speech: paper crops (`crop`) or whole utterances in length buckets (`utterance`)."""
    train = store.split("train")
    if cfg.mode == "crop":
        need = cfg.sample_frames + 2
        usable = [e for e in train if e["frames"] > need]
        if not usable:
            raise UserError(f"no training utterance is longer than the {need} frames a crop needs "
                            f"(data.sample_frames={cfg.sample_frames} + 2 context frames)")
        items = SpeechItems(store, usable, speakers)
        fetch = lambda pairs: collate_speech([items.item(i, g, need) for i, g in pairs], with_lengths=False)  # noqa: E731
        return StepBatches(len(items), cfg.batch_size, seed, fetch, rank=rank, world=world)
    if cfg.mode == "utterance":
        usable = [e for e in train if e["frames"] >= 6]
        if not usable:
            raise UserError("no training utterance is long enough (at least 6 frames)")
        if len(usable) < world:
            raise UserError(f"utterance mode on {world} processes needs at least {world} training utterances "
                            f"(found {len(usable)})")
        items = SpeechItems(store, usable, speakers)
        buckets = length_buckets([e["frames"] for e in usable], cfg.batch_size, cfg.max_frames)
        if len(buckets) > 1 and len(buckets[-1]) < cfg.batch_size:  # the short remainder joins its neighbour,
            buckets[-2:] = [buckets[-2] + buckets[-1]]                 # whatever the number of processes
        fetch = lambda pairs: collate_speech([items.item(i, g, cfg.max_frames) for i, g in pairs], with_lengths=True)  # noqa: E731
        return StepBatches(len(items), cfg.batch_size, seed, fetch, buckets=buckets, rank=rank, world=world)
    raise UserError(f"unknown data.mode '{cfg.mode}' (valid: crop, utterance)")


def image_batches(dataset, cfg: DataConfig, seed: int, rank: int = 0, world: int = 1) -> StepBatches:
    """Training batches of an image dataset whose items are dicts of tensors."""
    fetch = lambda pairs: collate_images([dataset[i] for i, _ in pairs])  # noqa: E731
    return StepBatches(len(dataset), cfg.batch_size, seed, fetch, rank=rank, world=world)


def eval_speech_batches(store: FeatureSource, entries: list[dict[str, Any]], speakers: list[str], batch_size: int,
                        max_frames: int = 4000):
    """Whole utterances (frame count trimmed to even), in length buckets with lengths for masking."""
    items = SpeechItems(store, entries, speakers)
    lengths = [e["frames"] - e["frames"] % 2 for e in entries]
    for bucket in length_buckets(lengths, batch_size, max_frames):
        batch = [items.item(i) for i in bucket]
        for item, i in zip(batch, bucket):
            item["mel"] = item["mel"][:, : lengths[i]]
        yield [entries[i] for i in bucket], collate_speech(batch, with_lengths=True)
