"""Training batches as a pure function of (seed, step): exact resume and per-rank slices come for free.

`StepBatches[step]` is the whole batch of that step. Items are drawn from an endless stream of seeded epoch
permutations (crop mode, images) or of shuffled length buckets (whole-utterance mode).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sqaudio.config import DataConfig
from sqaudio.errors import UserError


class FeatureSource(Protocol):
    """What batches read of a feature store (`sqaudio.data.store.Store`): its manifest entries, one feature file,
    and a split's pack. Named here, not imported, so that loading batches does not load the store's writers."""

    root: Path

    def split(self, name: str) -> list[dict[str, Any]]: ...

    def load(self, entry: dict[str, Any], mmap: bool = False) -> np.ndarray: ...

    def packed(self, split: str, build: bool = False) -> Any: ...


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A torch RNG determined by the seed and integer keys (step, epoch, ...)."""
    mixed = seed
    for k in keys:
        mixed = (mixed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


class SpeechItems:
    """Utterances of some entries, read from their split's pack (one memory map per split, opened on first read
    in each process) or, for an entry outside any pack, from its own feature file.

    `window(i, g, frames)` picks a crop of `frames` frames (or the whole utterance); `batch` reads and pads them.

    Args:
        store: the prepared feature store.
        entries: manifest entries to use.
        speakers: speaker table (index = embedding row).
        packs: split -> `sqaudio.data.store.Pack` (path, id -> first row); {} reads every utterance's own file.
    """

    def __init__(self, store: FeatureSource, entries: list[dict[str, Any]], speakers: list[str],
                 packs: dict[str, Any] | None = None):
        index = {s: i for i, s in enumerate(speakers)}
        self.store, self.entries, self.packs = store, entries, {k: v for k, v in (packs or {}).items() if v}
        self.frames = [int(e["frames"]) for e in entries]
        self.speakers = [index[e["speaker"]] for e in entries]
        self.rows = [self._row(e) for e in entries]  # (split, first row) in a pack, or None
        self._arrays: dict[str, np.ndarray] = {}

    def _row(self, entry: dict[str, Any]) -> tuple[str, int] | None:
        pack = self.packs.get(entry["split"])
        first = pack.rows.get(entry["id"]) if pack else None
        return None if first is None else (entry["split"], first)

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": {}}  # a process opens its own maps (a pickled map would copy the data)

    def window(self, i: int, g: torch.Generator | None = None, frames: int | None = None) -> tuple[int, int, int]:
        """(item, start, length): a crop of `frames` frames at a start drawn from `g` (0 without), or the whole."""
        total = self.frames[i]
        if frames is None or total <= frames:
            return i, 0, total
        # the reference draws start in [0, total - frames - 1]
        start = int(torch.randint(0, total - frames, (1,), generator=g)) if g is not None else 0
        return i, start, frames

    def read(self, i: int, start: int, length: int) -> np.ndarray:
        """Frames [start, start + length) of item i: (n_mels, length), a view of the pack or of the file."""
        where = self.rows[i]
        if where is None:
            return self.store.load(self.entries[i], mmap=True)[:, start:start + length]
        split, first = where
        return self._array(split)[first + start:first + start + length].T

    def _array(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            path = self.packs[split].path
            try:
                self._arrays[split] = np.asarray(np.load(path, mmap_mode="r"))  # a plain view slices faster
            except (OSError, ValueError, EOFError) as err:
                raise UserError(f"cannot read features {path}: {err}; re-run prepare") from None
        return self._arrays[split]

    def batch(self, windows: list[tuple[int, int, int]], with_lengths: bool) -> dict[str, Tensor]:
        """The windows' mels padded with zeros to the longest, their speakers (and lengths, for masking)."""
        lengths = [length for _, _, length in windows]
        views = [self.read(*window) for window in windows]
        mel = np.zeros((len(views), views[0].shape[0], max(lengths)), dtype=np.float32)
        for row, view, length in zip(mel, views, lengths):
            row[:, :length] = view
        batch = {"mel": torch.from_numpy(mel), "speaker": torch.tensor([self.speakers[i] for i, _, _ in windows])}
        if with_lengths:
            batch["lengths"] = torch.tensor(lengths)
        return batch

    def crops(self, pairs: list[tuple[int, torch.Generator]], frames: int, with_lengths: bool) -> dict[str, Tensor]:
        """`StepBatches` fetch: a window of at most `frames` frames of each (item, RNG), as one batch."""
        return self.batch([self.window(i, g, frames) for i, g in pairs], with_lengths)


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
            return list(self.buckets[_permutation(len(self.buckets), self.seed, epoch, stream=1)[pos]])
        out, k, end = [], step * self.batch_size, (step + 1) * self.batch_size
        while k < end:  # positions k..end-1 of the endless stream of epoch permutations
            epoch, pos = divmod(k, self.n_items)
            take = min(end - k, self.n_items - pos)
            out += _permutation(self.n_items, self.seed, epoch)[pos:pos + take]
            k += take
        return out

    def global_size(self, step: int) -> int:
        """Items in step's global batch (utterance buckets differ in size)."""
        return len(self.indices(step)) if self.buckets else self.batch_size

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        positions = list(enumerate(self.indices(step)))[self.rank::self.world]
        return self.fetch([(i, step_generator(self.seed, 2, step, pos)) for pos, i in positions])


_PERM_CACHE: dict[tuple[int, int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int, stream: int = 0) -> list[int]:
    """The seeded order of one epoch (kept as a list: reading a tensor element costs microseconds)."""
    key = (n, seed, epoch, stream)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=step_generator(seed, stream, epoch)).tolist()
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
                   rank: int = 0, world: int = 1, packed: bool = True) -> StepBatches:
    """Training batches of speech: paper crops (`crop`) or whole utterances in length buckets (`utterance`).

    With `packed` (the default) they are read from the training split's pack, built first when missing or stale;
    `packed=False` reads every utterance's own file (what a store that cannot be written gets). Same values."""
    train = store.split("train")
    packs = {"train": store.packed("train", build=True)} if packed and train else {}
    if cfg.mode == "crop":
        need = cfg.sample_frames + 2
        usable = [e for e in train if e["frames"] > need]
        if not usable:
            raise UserError(f"no training utterance is longer than the {need} frames a crop needs "
                            f"(data.sample_frames={cfg.sample_frames} + 2 context frames)")
        items = SpeechItems(store, usable, speakers, packs)
        fetch = partial(items.crops, frames=need, with_lengths=False)
        return StepBatches(len(items), cfg.batch_size, seed, fetch, rank=rank, world=world)
    if cfg.mode == "utterance":
        usable = [e for e in train if e["frames"] >= 6]
        if not usable:
            raise UserError("no training utterance is long enough (at least 6 frames)")
        if len(usable) < world:
            raise UserError(f"utterance mode on {world} processes needs at least {world} training utterances "
                            f"(found {len(usable)})")
        items = SpeechItems(store, usable, speakers, packs)
        buckets = length_buckets([e["frames"] for e in usable], cfg.batch_size, cfg.max_frames)
        if len(buckets) > 1 and len(buckets[-1]) < cfg.batch_size:  # the short remainder joins its neighbour,
            buckets[-2:] = [buckets[-2] + buckets[-1]]                 # whatever the number of processes
        fetch = partial(items.crops, frames=cfg.max_frames, with_lengths=True)
        return StepBatches(len(items), cfg.batch_size, seed, fetch, buckets=buckets, rank=rank, world=world)
    raise UserError(f"unknown data.mode '{cfg.mode}' (valid: crop, utterance)")


def image_batches(dataset, cfg: DataConfig, seed: int, rank: int = 0, world: int = 1) -> StepBatches:
    """Training batches of an image dataset whose items are dicts of tensors."""
    fetch = lambda pairs: collate_images([dataset[i] for i, _ in pairs])  # noqa: E731
    return StepBatches(len(dataset), cfg.batch_size, seed, fetch, rank=rank, world=world)


def eval_speech_batches(store: FeatureSource, entries: list[dict[str, Any]], speakers: list[str], batch_size: int,
                        max_frames: int = 4000):
    """Whole utterances (frame count trimmed to even), in length buckets with lengths for masking; read from the
    packs that exist and match the manifest, else file by file."""
    packs = {split: store.packed(split) for split in sorted({e["split"] for e in entries})}
    items = SpeechItems(store, entries, speakers, packs)
    lengths = [e["frames"] - e["frames"] % 2 for e in entries]
    for bucket in length_buckets(lengths, batch_size, max_frames):
        yield [entries[i] for i in bucket], items.batch([(i, 0, lengths[i]) for i in bucket], with_lengths=True)
