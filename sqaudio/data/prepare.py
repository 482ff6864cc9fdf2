"""`sqaudio prepare`: a corpus on disk -> the prepared feature store (see sqaudio/data/store.py).

Parallel (sqaudio/data/extract.py), resumable (utterances whose feature file is already valid are kept), atomic
(every file goes through a temporary file and a rename; the manifest is written last, and a journal of finished
utterances makes a killed run resumable), and robust: audio that cannot give a valid feature is skipped with its
reason, never a crash.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sqaudio.config import FeatureConfig, feature_mismatch
from sqaudio.data.corpora import Listing, Utterance, list_corpus, unit_hash
from sqaudio.data.extract import DEVICE_BATCH_SECONDS, feature_file, run_jobs, run_jobs_on_device
from sqaudio.data.features import check_config
from sqaudio.data.store import (
    SKIPPED,
    Journal,
    Store,
    has_feature,
    link_feature,
    open_store,
    previous_entries,
    read_jsonl,
    remove_orphans,
    saved_feature_config,
    write_feature_config,
    write_store,
)
from sqaudio.distributed import pick_device
from sqaudio.errors import UserError


@dataclass
class PrepareOptions:
    """How `prepare` lists a corpus and computes its features.

    Args:
        layout: "auto" or a corpus layout name (vctk, zerospeech2019, folder; see sqaudio.data.corpora).
        mic: VCTK 0.92 microphone.
        test_fraction, seed: held-out test split of VCTK and folder corpora.
        split_files: reference split files / evaluation lists replacing the layout's listing.
        workers: processes (None: all cores available to this process).
        shard: (i, n): only the i-th of n deterministic parts of the corpus (merge with `merge_stores`).
        device: where features are computed; not "cpu": in batches there, audio read by `workers` threads.
        batch_seconds: off the CPU, the most padded audio (seconds) in one device batch (None: 600, ~1 GB there).
        quiet: no progress bar and no tables.
    """

    layout: str = "auto"
    mic: int = 1
    test_fraction: float = 0.05
    seed: int = 0
    split_files: list[Path] = field(default_factory=list)
    workers: int | None = None
    shard: tuple[int, int] | None = None
    device: str = "cpu"
    batch_seconds: float | None = None
    quiet: bool = False


@dataclass
class SplitSummary:
    utterances: int
    speakers: int
    hours: float
    frames: int


@dataclass
class PrepareSummary:
    """What a `prepare` (or `merge_stores`) run wrote.

    Args:
        splits: counts per split ("train", "test").
        speakers: training speakers (rows of speakers.json).
        skipped: skipped files by reason; skipped_examples: one file per reason.
        reused, computed: utterances kept from an earlier run and computed now.
    """

    layout: str
    corpus: str
    out_dir: str
    splits: dict[str, SplitSummary]
    speakers: int
    skipped: dict[str, int]
    skipped_examples: dict[str, str]
    orphans_removed: int
    reused: int = 0
    computed: int = 0
    workers: int = 0
    wall_s: float = 0.0


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(corpus_dir: str | Path, out_dir: str | Path, features: FeatureConfig | None = None,
            options: PrepareOptions | None = None, console: Console | None = None) -> PrepareSummary:
    """Prepare a corpus into a feature store at `out_dir`; re-running resumes.

    Args:
        corpus_dir: the corpus folder (see sqaudio.data.corpora for the layouts).
        out_dir: the store to write: manifest.jsonl, features/, packed/, feature_config.json, speakers.json,
            skipped.jsonl.
        features: the feature settings (default: the paper's).
        options: listing and processing options (default: PrepareOptions()).
        console: where the progress bar and tables go.
    """
    cfg = check_config(features or FeatureConfig())
    options = options or PrepareOptions()
    batch_seconds = DEVICE_BATCH_SECONDS if options.batch_seconds is None else options.batch_seconds
    if not (math.isfinite(batch_seconds) and batch_seconds > 0):
        raise UserError(f"--batch-seconds must be a number of seconds > 0, got {batch_seconds}")
    device = pick_device(options.device)
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    listing = list_corpus(corpus_dir, options.layout, options.mic, options.test_fraction, options.seed,
                          options.split_files or None)
    if options.shard is not None:
        listing = shard_listing(listing, *options.shard)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {out_dir} exists and is not a folder")
    _check_saved_features(out_dir, cfg)
    if not options.quiet:
        speakers = len({u.speaker for u in listing.utterances})
        console.print(f"corpus: {listing.layout} in {listing.root}: {len(listing.utterances)} utterances, "
                      f"{speakers} speakers", highlight=False)
        if listing.note():  # files that are not audio, counted
            console.print(listing.note(), highlight=False)
    write_feature_config(out_dir, cfg)

    start = time.perf_counter()
    previous = previous_entries(out_dir)
    entries, todo = {}, []
    for utt in listing.utterances:
        if _reusable(previous.get(utt.id), utt, out_dir, cfg.n_mels):
            entries[utt.id] = previous[utt.id]
        else:
            todo.append(utt)
    reused = len(entries)
    todo.sort(key=_size_desc)  # longest first: the pool's last tasks are short ones
    skipped = list(listing.skipped)
    workers = max(1, options.workers or default_workers())
    with Journal(out_dir) as journal, _progress(console, options.quiet) as progress:
        task = progress.add_task("prepare", total=len(todo))
        jobs = (run_jobs(todo, out_dir, cfg, workers) if device.type == "cpu"
                else run_jobs_on_device(todo, out_dir, cfg, workers, device, batch_seconds))
        with closing(jobs):  # an error or Ctrl-C stops the jobs at once (no read of the rest of the corpus)
            for result in jobs:
                if result.entry is not None:
                    entries[result.entry["id"]] = result.entry
                    journal.add(result.entry)
                else:
                    skipped.append(result.skipped)
                progress.advance(task)
    store = write_store(out_dir, entries.values(), skipped, cfg)
    summary = summarize(store, listing, skipped, remove_orphans(store))
    summary.reused, summary.computed, summary.workers = reused, len(entries) - reused, workers
    summary.wall_s = round(time.perf_counter() - start, 3)
    if not options.quiet:
        print_summary(summary, Console())
    return summary


def _check_saved_features(out_dir: Path, cfg: FeatureConfig) -> None:
    """Refuse to resume a store prepared with other feature settings."""
    saved = saved_feature_config(out_dir)
    if saved is not None and saved != cfg:
        diff = "; ".join(feature_mismatch(cfg, saved, ("requested", "stored")))
        raise UserError(f"{out_dir} holds features made with other settings ({diff}): "
                        "choose another OUT_DIR or delete it")


def _reusable(entry: dict[str, Any] | None, utt: Utterance, out_dir: Path, n_mels: int) -> bool:
    """True when `entry` describes exactly this utterance and its feature file holds a (n_mels, frames) float32."""
    if entry is None:
        return False
    same = (entry.get("source") == str(utt.path) and entry.get("speaker") == utt.speaker
            and entry.get("split") == utt.split and entry.get("features") == feature_file(utt)
            and float(entry.get("offset") or 0.0) == utt.offset and entry.get("duration") == utt.duration)
    return same and has_feature(out_dir, entry, n_mels)


def shard_listing(listing: Listing, index: int, count: int) -> Listing:
    """The utterances (and pre-read skips) of shard `index` of `count`, by a stable hash of their id."""
    if not 0 <= index < count:
        raise UserError(f"--shard {index}/{count}: need 0 <= i < n")

    def mine(key: str) -> bool:
        return int(unit_hash("shard", key) * count) == index

    return Listing(f"{listing.layout}, shard {index}/{count}", listing.root,
                   [u for u in listing.utterances if mine(u.id)],
                   [s for s in listing.skipped if mine(str(s.get("id", s["source"])))])


def merge_stores(out_dir: str | Path, shard_dirs: list[Path], quiet: bool = False) -> PrepareSummary:
    """Merge prepared shard stores into one store: feature files are hard-linked (or copied), manifests joined."""
    out_dir = Path(out_dir)
    stores = [open_store(d) for d in shard_dirs]
    if any(s.features != stores[0].features for s in stores):
        raise UserError("the shards were prepared with different feature settings")
    entries: dict[str, dict[str, Any]] = {}
    skipped = []
    for shard in stores:
        for entry in shard.entries:
            if entry["id"] in entries and entries[entry["id"]]["source"] != entry["source"]:
                raise UserError(f"utterance id {entry['id']} comes from two different files in the shards")
            link_feature(shard, entry, out_dir)
            entries[entry["id"]] = entry
        if (shard.root / SKIPPED).is_file():
            skipped += read_jsonl(shard.root / SKIPPED)
    write_feature_config(out_dir, stores[0].features)
    store = write_store(out_dir, entries.values(), skipped, stores[0].features)
    listing = Listing(f"merged from {len(stores)} shards", out_dir, [])
    summary = summarize(store, listing, skipped, remove_orphans(store))
    summary.computed = len(entries)
    if not quiet:
        print_summary(summary, Console())
    return summary


def _size_desc(utt: Utterance) -> float:
    try:
        return -(utt.duration if utt.duration is not None else utt.path.stat().st_size)
    except OSError:
        return 0.0


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, disable=quiet, transient=False)


# ----------------------------------------------------------------------------------------------- summary

def summarize(store: Store, listing: Listing, skipped: list[dict[str, Any]], orphans: int) -> PrepareSummary:
    """Counts per split and skipped files by reason (with one example each, relative to the corpus)."""
    splits = {}
    for split in ("train", "test"):
        part = store.split(split)
        splits[split] = SplitSummary(len(part), len({e["speaker"] for e in part}),
                                     sum(e["duration_s"] for e in part) / 3600, sum(e["frames"] for e in part))
    reasons = Counter(_reason_key(s["reason"]) for s in skipped)
    examples = {}
    for s in skipped:
        source = Path(s["source"])
        examples.setdefault(_reason_key(s["reason"]), str(source.relative_to(listing.root)
                                                          if source.is_relative_to(listing.root) else source))
    return PrepareSummary(listing.layout, str(listing.root), str(store.root), splits, len(store.speakers),
                          dict(reasons), examples, orphans)


def _reason_key(reason: str) -> str:
    """Group skip reasons: the text before the first ':' ("too short: 0.02 s ..." -> "too short")."""
    return reason.split(":")[0].strip()


def print_summary(summary: PrepareSummary, console: Console) -> None:
    """The closing tables: per split counts, then skipped files by reason."""
    table = Table(title=f"prepared {summary.out_dir} ({summary.layout})")
    for column in ("split", "utterances", "speakers", "hours", "frames"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, counts in summary.splits.items():
        table.add_row(split, f"{counts.utterances:,}", str(counts.speakers), f"{counts.hours:.3f}",
                      f"{counts.frames:,}")
    console.print(table)
    console.print(f"{summary.computed} computed, {summary.reused} already done, {summary.workers} worker(s), "
                  f"{summary.wall_s:.1f} s; {summary.speakers} training speakers in speakers.json", highlight=False)
    if summary.skipped:
        skipped = Table(title=f"skipped files ({sum(summary.skipped.values())}, see skipped.jsonl)")
        for column in ("reason", "files", "example"):
            skipped.add_column(column, justify="right" if column == "files" else "left", overflow="fold")
        for reason, count in sorted(summary.skipped.items(), key=lambda kv: -kv[1]):
            skipped.add_row(reason, str(count), summary.skipped_examples[reason])
        console.print(skipped)
