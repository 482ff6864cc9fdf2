"""`sqaudio prepare`: a corpus on disk -> the prepared feature store (see sqaudio/store.py).

Parallel (a process pool, one torch thread per worker), resumable (utterances whose feature file is already valid
are kept), atomic (every file goes through a temporary file and a rename; the manifest is written last, and a
journal of finished utterances makes a killed run resumable), and robust: audio that cannot give a valid feature
is skipped with its reason, never a crash.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sqaudio.config import FeatureConfig, from_dict, to_dict
from sqaudio.data.corpora import Listing, Utterance, list_corpus, unit_hash
from sqaudio.data.features import AudioError, LogMel, check_config, load_audio, log_mel_spectrogram
from sqaudio.data.store import FEATURE_CONFIG, MANIFEST, SKIPPED, SPEAKERS, feature_config_json
from sqaudio.errors import UserError
from sqaudio.files import atomic_write

MIN_FRAMES = 4  # the speech encoder needs 4 frames for one latent
JOURNAL = ".prepare-journal.jsonl"  # finished utterances of an unfinished run (removed when the manifest is written)


def feature_path(utt: Utterance) -> str:
    """Store-relative path of an utterance's feature file."""
    return f"features/{utt.split}/{utt.speaker}/{utt.id}.npy"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------- one utterance

def process(utt: Utterance, out_dir: str, cfg: FeatureConfig) -> dict[str, Any]:
    """Compute and write one utterance's feature. Returns {"entry": manifest entry} or {"skipped": {source, reason}}.

    Bad audio becomes a skip; an error writing the output (e.g. a full disk) is raised.
    """
    wav = _load(utt, cfg)
    if isinstance(wav, dict):
        return wav
    return _store(utt, Path(out_dir), cfg, wav, lambda: log_mel_spectrogram(wav, cfg))


def _load(utt: Utterance, cfg: FeatureConfig) -> np.ndarray | dict[str, Any]:
    """The utterance's 16 kHz waveform, or its skip record."""
    try:
        return load_audio(utt.path, cfg, utt.offset, utt.duration)
    except AudioError as err:
        return _skip(utt, str(err))
    except (RuntimeError, ValueError, MemoryError) as err:  # decoder/resampler failures on odd input
        return _skip(utt, _failure(err))


def _failure(err: Exception) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"cannot process: {type(err).__name__}: {first_line}"


def _store(utt: Utterance, out_dir: Path, cfg: FeatureConfig, wav: np.ndarray, compute) -> dict[str, Any]:
    """Check the feature `compute()` returns, write it atomically and return the manifest entry (or a skip)."""
    try:
        mel = compute()
        if mel.shape[1] < MIN_FRAMES:
            raise AudioError(f"too short: {mel.shape[1]} frames, the encoder needs at least {MIN_FRAMES}")
        if not np.all(np.isfinite(mel)):
            raise AudioError("the feature is not finite")
    except AudioError as err:
        return _skip(utt, str(err))
    except (RuntimeError, ValueError, MemoryError) as err:
        return _skip(utt, _failure(err))
    rel = feature_path(utt)
    atomic_write(out_dir / rel, lambda tmp: _save_npy(tmp, mel))
    entry = {"id": utt.id, "speaker": utt.speaker, "split": utt.split, "source": str(utt.path), "features": rel,
             "frames": int(mel.shape[1]), "duration_s": round(len(wav) / cfg.sample_rate, 6)}
    if utt.offset or utt.duration is not None:
        entry.update(offset=utt.offset, duration=utt.duration)
    return {"entry": entry}


def _skip(utt: Utterance, reason: str) -> dict[str, Any]:
    return {"skipped": {"source": str(utt.path), "reason": reason, "id": utt.id, "speaker": utt.speaker}}


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # atomic_write's temporary files are 0600; store files get the usual umask mode


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
        np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    os.chmod(path, FILE_MODE)


def _write_text(path: Path, text: str) -> None:
    """Atomically replace a text file of the store."""
    def write(tmp: Path) -> None:
        tmp.write_text(text)
        os.chmod(tmp, FILE_MODE)
    atomic_write(path, write)


def _init_worker() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which cancels the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (which stops the run)


def _run_jobs(todo: list[Utterance], out_dir: Path, cfg: FeatureConfig, workers: int) -> Iterator[dict[str, Any]]:
    """Results of `process` as utterances finish (in-process for one worker, else a forkserver process pool)."""
    if workers <= 1 or len(todo) <= 1:
        with _torch_threads(1):
            for utt in todo:
                yield process(utt, str(out_dir), cfg)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["sqaudio.data.prepare"])  # torch is imported once, workers fork from that server
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker)
    try:
        pending = {pool.submit(process, utt, str(out_dir), cfg) for utt in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


DEVICE_BATCH = 32  # utterances per feature batch on an accelerator


def _run_jobs_device(todo: list[Utterance], out_dir: Path, cfg: FeatureConfig, workers: int,
                     device: torch.device) -> Iterator[dict[str, Any]]:
    """Audio is read and resampled by a thread pool, at most 2 batches ahead (bounded memory); features are
    computed on `device` in batches. On an error or Ctrl-C the queued reads are cancelled at once."""
    from concurrent.futures import ThreadPoolExecutor

    logmel = LogMel(cfg).to(device)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        batch: list[tuple[Utterance, np.ndarray]] = []
        for utt, wav in read_ahead(pool, todo, lambda u: (u, _load(u, cfg)), 2 * DEVICE_BATCH + workers):
            if isinstance(wav, dict):
                yield wav
                continue
            batch.append((utt, wav))
            if len(batch) == DEVICE_BATCH:
                yield from _store_batch(batch, logmel, out_dir, cfg)
                batch = []
        yield from _store_batch(batch, logmel, out_dir, cfg)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # waits only for the reads already running


def read_ahead(pool, items: list, fn, limit: int) -> Iterator[Any]:
    """fn(item) for every item, in order, computed by `pool` with at most `limit` results not yet taken."""
    from collections import deque

    pending, rest = deque(), iter(items)
    for item in rest:
        pending.append(pool.submit(fn, item))
        if len(pending) >= limit:
            break
    while pending:
        result = pending.popleft().result()
        for item in rest:
            pending.append(pool.submit(fn, item))
            break
        yield result


def _store_batch(batch, logmel: LogMel, out_dir: Path, cfg: FeatureConfig) -> Iterator[dict[str, Any]]:
    if not batch:
        return
    device = logmel.fbank.device
    mels = logmel.batch([torch.from_numpy(wav).to(device) for _, wav in batch])
    for (utt, wav), mel in zip(batch, mels):
        yield _store(utt, out_dir, cfg, wav, lambda m=mel: m.float().cpu().numpy())


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- resume

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


def _previous_entries(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Entries of an earlier run (its manifest, then its journal), by id."""
    rows = _read_jsonl_tolerant(out_dir / MANIFEST) + _read_jsonl_tolerant(out_dir / JOURNAL)
    return {str(r["id"]): r for r in rows if "id" in r}


def _reusable(entry: dict[str, Any] | None, utt: Utterance, out_dir: Path, n_mels: int) -> bool:
    """True when `entry` describes exactly this utterance and its feature file holds a (n_mels, frames) float32."""
    if entry is None:
        return False
    same = (entry.get("source") == str(utt.path) and entry.get("speaker") == utt.speaker
            and entry.get("split") == utt.split and entry.get("features") == feature_path(utt)
            and float(entry.get("offset") or 0.0) == utt.offset and entry.get("duration") == utt.duration)
    if not same:
        return False
    try:
        array = np.load(out_dir / entry["features"], mmap_mode="r")
        return array.dtype == np.float32 and array.shape == (n_mels, int(entry["frames"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_feature_config(out_dir: Path, cfg: FeatureConfig) -> None:
    path = out_dir / FEATURE_CONFIG
    if not path.is_file():
        return
    try:
        saved = from_dict(FeatureConfig, json.loads(path.read_text()), "features")
    except (ValueError, UserError):
        raise UserError(f"{path} is unreadable: delete {out_dir} or choose another OUT_DIR") from None
    if saved != cfg:
        diff = [f"{k} {v} -> {to_dict(cfg)[k]}" for k, v in to_dict(saved).items() if to_dict(cfg)[k] != v]
        raise UserError(f"{out_dir} holds features made with other settings ({'; '.join(diff)}): "
                        "choose another OUT_DIR or delete it")


def _remove_orphans(out_dir: Path, keep: set[str]) -> int:
    """Delete feature files no manifest entry names (e.g. after the split settings changed) and stale temporaries."""
    removed = 0
    features = out_dir / "features"
    for path in features.rglob("*") if features.is_dir() else []:
        rel = path.relative_to(out_dir).as_posix()
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_file() and (stale_tmp or (path.suffix == ".npy" and rel not in keep)):
            path.unlink()
            removed += 1
    return removed


# ----------------------------------------------------------------------------------------------- the job

def prepare(corpus_dir: str | Path, out_dir: str | Path, corpus: str = "auto", mic: int = 1,
            test_fraction: float = 0.05, workers: int | None = None, feature_config: FeatureConfig | None = None,
            split_files: list[Path] | None = None, seed: int = 0, quiet: bool = False,
            console: Console | None = None, shard: tuple[int, int] | None = None,
            device: str = "cpu") -> dict[str, Any]:
    """Prepare a corpus into a feature store at `out_dir`; re-running resumes. Returns the summary dict.

    Args:
        corpus_dir: the corpus folder (see sqaudio.data.corpora for the layouts).
        out_dir: the store to write: manifest.jsonl, features/, feature_config.json, speakers.json, skipped.jsonl.
        corpus: "auto" or a layout name (vctk, zerospeech2019, folder).
        mic: VCTK 0.92 microphone.
        test_fraction, seed: held-out test split of VCTK and folder corpora.
        workers: processes (default: all cores available to this process).
        feature_config: the features (default: the paper's).
        split_files: reference split files / evaluation lists replacing the layout's listing.
        quiet: no progress bar and no tables.
        console: where the progress bar and tables go.
        shard: (i, n): only the i-th of n deterministic parts of the corpus (merge with `merge_stores`).
        device: where features are computed; not "cpu": in batches there, audio read by `workers` threads.
    """
    from sqaudio.distributed import pick_device

    cfg = check_config(feature_config or FeatureConfig())
    dev = pick_device(device)
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    listing = list_corpus(corpus_dir, corpus, mic, test_fraction, seed, split_files)
    if shard is not None:
        listing = shard_listing(listing, *shard)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {out_dir} exists and is not a folder")
    _check_feature_config(out_dir, cfg)
    if not quiet:
        n_spk = len({u.speaker for u in listing.utterances})
        console.print(f"corpus: {listing.layout} in {listing.root}: {len(listing.utterances)} utterances, "
                      f"{n_spk} speakers", highlight=False)
        if listing.note():  # files that are not audio, counted
            console.print(listing.note(), highlight=False)
    _write_text(out_dir / FEATURE_CONFIG, feature_config_json(cfg))

    start = time.perf_counter()
    previous = _previous_entries(out_dir)
    entries, todo = {}, []
    for utt in listing.utterances:
        if _reusable(previous.get(utt.id), utt, out_dir, cfg.n_mels):
            entries[utt.id] = previous[utt.id]
        else:
            todo.append(utt)
    reused = len(entries)
    todo.sort(key=_size_desc)  # longest first: the pool's last tasks are short ones
    skipped = list(listing.skipped)
    workers = max(1, workers or default_workers())
    with (out_dir / JOURNAL).open("a") as journal, _progress(console, quiet) as progress:
        task = progress.add_task("prepare", total=len(todo))
        jobs = (_run_jobs(todo, out_dir, cfg, workers) if dev.type == "cpu"
                else _run_jobs_device(todo, out_dir, cfg, workers, dev))
        with closing(jobs):  # an error or Ctrl-C stops the jobs at once (no read of the rest of the corpus)
            for result in jobs:
                if "entry" in result:
                    entries[result["entry"]["id"]] = result["entry"]
                    journal.write(json.dumps(result["entry"]) + "\n")
                    journal.flush()
                else:
                    skipped.append(result["skipped"])
                progress.advance(task)
    summary = _write_store(out_dir, listing, entries, skipped)
    summary.update(reused=reused, computed=len(entries) - reused, workers=workers,
                   wall_s=round(time.perf_counter() - start, 3))
    if not quiet:
        print_summary(summary, Console())
    return summary


def shard_listing(listing: Listing, index: int, count: int) -> Listing:
    """The utterances (and pre-read skips) of shard `index` of `count`, by a stable hash of their id."""
    if not 0 <= index < count:
        raise UserError(f"--shard {index}/{count}: need 0 <= i < n")
    mine = lambda key: int(unit_hash("shard", key) * count) == index  # noqa: E731
    return Listing(f"{listing.layout}, shard {index}/{count}", listing.root,
                   [u for u in listing.utterances if mine(u.id)],
                   [s for s in listing.skipped if mine(str(s.get("id", s["source"])))])


def merge_stores(out_dir: str | Path, shard_dirs: list[Path], quiet: bool = False) -> dict[str, Any]:
    """Merge prepared shard stores into one store: feature files are hard-linked (or copied), manifests joined."""
    import shutil

    from sqaudio.data.store import open_store, read_jsonl

    out_dir = Path(out_dir)
    stores = [open_store(d) for d in shard_dirs]
    if any(s.features != stores[0].features for s in stores):
        raise UserError("the shards were prepared with different feature settings")
    entries: dict[str, dict[str, Any]] = {}
    skipped = []
    for store in stores:
        for entry in store.entries:
            if entry["id"] in entries and entries[entry["id"]]["source"] != entry["source"]:
                raise UserError(f"utterance id {entry['id']} comes from two different files in the shards")
            target = out_dir / entry["features"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(store.root / entry["features"], target)
                except OSError:
                    atomic_write(target, lambda tmp, src=store.root / entry["features"]: shutil.copyfile(src, tmp))
            entries[entry["id"]] = entry
        if (store.root / SKIPPED).is_file():
            skipped += read_jsonl(store.root / SKIPPED)
    _write_text(out_dir / FEATURE_CONFIG, feature_config_json(stores[0].features))
    listing = Listing(f"merged from {len(stores)} shards", out_dir, [])
    summary = _write_store(out_dir, listing, entries, skipped)
    summary.update(reused=0, computed=len(entries), workers=0, wall_s=0.0)
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


def _write_store(out_dir: Path, listing: Listing, entries: dict[str, dict], skipped: list[dict]) -> dict[str, Any]:
    """Write manifest, speakers and skipped list (each atomically), drop orphans and the journal; return the summary."""
    rows = sorted(entries.values(), key=lambda e: (e["split"], e["speaker"], e["id"]))
    speakers = sorted({e["speaker"] for e in rows if e["split"] == "train"})
    _write_text(out_dir / SKIPPED, "".join(json.dumps(s) + "\n" for s in skipped))
    _write_text(out_dir / SPEAKERS, json.dumps(speakers, indent=1) + "\n")
    _write_text(out_dir / MANIFEST, "".join(json.dumps(e) + "\n" for e in rows))
    (out_dir / JOURNAL).unlink(missing_ok=True)
    orphans = _remove_orphans(out_dir, {e["features"] for e in rows})
    splits = {}
    for split in ("train", "test"):
        part = [e for e in rows if e["split"] == split]
        splits[split] = {"utterances": len(part), "speakers": len({e["speaker"] for e in part}),
                         "hours": sum(e["duration_s"] for e in part) / 3600, "frames": sum(e["frames"] for e in part)}
    reasons = Counter(_reason_key(s["reason"]) for s in skipped)
    examples = {}
    for s in skipped:
        source = Path(s["source"])
        examples.setdefault(_reason_key(s["reason"]), str(source.relative_to(listing.root)
                                                          if source.is_relative_to(listing.root) else source))
    return {"layout": listing.layout, "corpus": str(listing.root), "out_dir": str(out_dir), "splits": splits,
            "speakers": len(speakers), "skipped": dict(reasons), "skipped_examples": examples,
            "orphans_removed": orphans}


def _reason_key(reason: str) -> str:
    """Group skip reasons: the text before the first ':' ("too short: 0.02 s ..." -> "too short")."""
    return reason.split(":")[0].strip()


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The closing tables: per split counts, then skipped files by reason."""
    table = Table(title=f"prepared {summary['out_dir']} ({summary['layout']})")
    for column in ("split", "utterances", "speakers", "hours", "frames"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, s in summary["splits"].items():
        table.add_row(split, f"{s['utterances']:,}", str(s["speakers"]), f"{s['hours']:.3f}", f"{s['frames']:,}")
    console.print(table)
    console.print(f"{summary['computed']} computed, {summary['reused']} already done, {summary['workers']} worker(s), "
                  f"{summary['wall_s']:.1f} s; {summary['speakers']} training speakers in speakers.json",
                  highlight=False)
    if summary["skipped"]:
        skipped = Table(title=f"skipped files ({sum(summary['skipped'].values())}, see skipped.jsonl)")
        for column in ("reason", "files", "example"):
            skipped.add_column(column, justify="right" if column == "files" else "left", overflow="fold")
        for reason, count in sorted(summary["skipped"].items(), key=lambda kv: -kv[1]):
            skipped.add_row(reason, str(count), summary["skipped_examples"][reason])
        console.print(skipped)


def parse_feature_options(recipe: str | None = None, overrides: list[str] | None = None) -> FeatureConfig:
    """FeatureConfig from a recipe's `features` section (or the defaults) with `key=value` overrides
    (`n_mels=40` or `features.n_mels=40`)."""
    from sqaudio.config import apply_overrides, load_recipe

    base = to_dict(load_recipe(recipe).features) if recipe else to_dict(FeatureConfig())
    items = [o if o.startswith("features.") else f"features.{o}" for o in overrides or []]
    data = apply_overrides({"features": base}, items)["features"]
    return check_config(from_dict(FeatureConfig, data, "features"))
