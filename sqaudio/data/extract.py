"""Feature extraction for `prepare`: utterances -> feature files in the store, each giving a manifest entry or a skip.

On the CPU each utterance is one job (in-process for one worker, else a forkserver process pool with one torch
thread per worker). On an accelerator a thread pool reads and resamples audio a bounded window ahead (in bytes)
while the features are computed there in batches bounded by their padded samples; a batch that runs out of device
memory is halved and retried. Audio that cannot give a valid feature is skipped with its reason, never a crash; an
error writing the output (e.g. a full disk) is raised.
"""
from __future__ import annotations

import math
import multiprocessing
import signal
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from sqaudio.config import FeatureConfig
from sqaudio.data.audio import AudioError, load_audio
from sqaudio.data.corpora import Utterance
from sqaudio.data.features import LogMel, log_mel_spectrogram
from sqaudio.data.store import feature_path, write_feature
from sqaudio.errors import UserError

MIN_FRAMES = 4  # the speech encoder needs 4 frames for one latent
DEVICE_BATCH_SECONDS = 600.0  # padded audio per device batch (its log-mel peaks at ~1.1 GB, measured on the CPU)
T = TypeVar("T")


@dataclass
class Result:
    """What one utterance gave: its manifest entry, or (when it was skipped) the skip record."""

    entry: dict[str, Any] | None = None
    skipped: dict[str, Any] | None = None


def feature_file(utt: Utterance) -> str:
    """Store-relative path of an utterance's feature file."""
    return feature_path(utt.split, utt.speaker, utt.id)


def process(utt: Utterance, out_dir: str, cfg: FeatureConfig) -> Result:
    """Compute and write one utterance's feature."""
    wav = _load(utt, cfg)
    if isinstance(wav, Result):
        return wav
    return _store(utt, Path(out_dir), cfg, wav, lambda: log_mel_spectrogram(wav, cfg))


def _load(utt: Utterance, cfg: FeatureConfig) -> np.ndarray | Result:
    """The utterance's waveform at the feature rate, or its skip."""
    try:
        return load_audio(utt.path, cfg, utt.offset, utt.duration)
    except AudioError as err:
        return _skip(utt, str(err))
    except (RuntimeError, ValueError, MemoryError) as err:  # decoder/resampler failures on odd input
        return _skip(utt, _failure(err))


def _failure(err: Exception) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"cannot process: {type(err).__name__}: {first_line}"


def _store(utt: Utterance, out_dir: Path, cfg: FeatureConfig, wav: np.ndarray,
           compute: Callable[[], np.ndarray]) -> Result:
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
    relative = feature_file(utt)
    write_feature(out_dir, relative, mel)
    entry = {"id": utt.id, "speaker": utt.speaker, "split": utt.split, "source": str(utt.path),
             "features": relative, "frames": int(mel.shape[1]), "duration_s": round(len(wav) / cfg.sample_rate, 6)}
    if utt.offset or utt.duration is not None:
        entry.update(offset=utt.offset, duration=utt.duration)
    return Result(entry=entry)


def _skip(utt: Utterance, reason: str) -> Result:
    return Result(skipped={"source": str(utt.path), "reason": reason, "id": utt.id, "speaker": utt.speaker})


def _init_worker() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which cancels the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (which stops the run)


def run_jobs(todo: list[Utterance], out_dir: Path, cfg: FeatureConfig, workers: int) -> Iterator[Result]:
    """Results of `process` as utterances finish (in-process for one worker, else a forkserver process pool)."""
    if workers <= 1 or len(todo) <= 1:
        with _torch_threads(1):
            for utt in todo:
                yield process(utt, str(out_dir), cfg)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sqaudio.data.extract"])  # torch is imported once, workers fork from there
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context, initializer=_init_worker)
    try:
        pending = {pool.submit(process, utt, str(out_dir), cfg) for utt in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_jobs_on_device(todo: list[Utterance], out_dir: Path, cfg: FeatureConfig, workers: int,
                       device: torch.device, batch_seconds: float = DEVICE_BATCH_SECONDS) -> Iterator[Result]:
    """Audio is read and resampled by a thread pool (waiting results: under two batches' samples, plus what the
    threads are reading); features are computed on `device` in batches of at most `batch_seconds` of padded audio,
    in `todo`'s order (longest first), each batch halved and retried when the device runs out of memory. On an
    error or Ctrl-C the queued reads are cancelled at once."""
    log_mel = LogMel(cfg).to(device)
    max_samples = max(1, round(batch_seconds * cfg.sample_rate))
    pool = ThreadPoolExecutor(max_workers=workers)
    skipped: list[Result] = []

    def describe(pair: tuple[Utterance, np.ndarray]) -> str:
        return f"{pair[0].path} ({pair[1].size / cfg.sample_rate:.0f} s)"

    def audio() -> Iterator[tuple[Utterance, np.ndarray]]:
        read = read_ahead(pool, todo, lambda u: (u, _load(u, cfg)), 4 * workers, _result_bytes, 8 * max_samples)
        for utt, wav in read:
            if isinstance(wav, Result):
                skipped.append(wav)
            else:
                yield utt, wav

    try:
        for batch in sample_batches(audio(), lambda pair: pair[1].size + cfg.n_fft, max_samples):
            yield from skipped
            skipped.clear()
            mels = split_on_oom(lambda part: _features(part, log_mel), batch, describe, device)
            for (utt, wav), mel in zip(batch, mels):
                yield _store(utt, out_dir, cfg, wav, lambda m=mel: m)
        yield from skipped
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # waits only for the reads already running


def sample_batches(items: Iterable[T], length: Callable[[T], int], max_samples: int) -> Iterator[list[T]]:
    """Consecutive items grouped so that each group padded to its longest (items x longest) holds at most
    `max_samples`; an item longer than that is a group of its own. Every item once, in order."""
    batch: list[T] = []
    longest = 0
    for item in items:
        size = length(item)
        if batch and (len(batch) + 1) * max(longest, size) > max_samples:
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, size)
    if batch:
        yield batch


def split_on_oom(compute: Callable[[list[T]], list[Any]], batch: list[T], describe: Callable[[T], str],
                 device: torch.device) -> list[Any]:
    """compute(batch); when it raises torch.OutOfMemoryError, the cached device memory is freed and each half is
    computed the same way. A single item that does not fit is a UserError naming it (`describe(item)`)."""
    try:
        return compute(batch)
    except torch.OutOfMemoryError:
        pass  # leave the handler first: its traceback holds the failed attempt's tensors
    _free_cached(device)
    if len(batch) == 1:
        raise UserError(f"out of memory on {device} computing the features of {describe(batch[0])}: "
                        "prepare with --device cpu")
    half = len(batch) // 2
    return (split_on_oom(compute, batch[:half], describe, device)
            + split_on_oom(compute, batch[half:], describe, device))


def _free_cached(device: torch.device) -> None:
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.empty_cache()


def _features(batch: list[tuple[Utterance, np.ndarray]], log_mel: LogMel) -> list[np.ndarray]:
    """The batch's log-mels, computed together on the LogMel's device and copied back: float32 (n_mels, frames)."""
    device = log_mel.fbank.device
    mels = log_mel.batch([torch.from_numpy(wav).to(device) for _, wav in batch])
    return [mel.float().cpu().numpy() for mel in mels]


def _result_bytes(result: tuple[Utterance, np.ndarray | Result]) -> int:
    return result[1].nbytes if isinstance(result[1], np.ndarray) else 0


_END = object()


def read_ahead(pool, items: Iterable[Any], fn: Callable, limit: int, size: Callable[[Any], int] | None = None,
               max_bytes: float = math.inf) -> Iterator[Any]:
    """fn(item) for every item, in order, computed by `pool`. At most `limit` items are submitted and not finished;
    with `size` (a result's bytes), none is submitted while the finished results not yet taken hold `max_bytes`, so
    the results held stay under max_bytes plus `limit` results."""
    pending: deque = deque()
    running: set = set()
    sizes: dict[Any, int] = {}
    rest, held = iter(items), 0
    while True:
        for future in [f for f in running if f.done()]:
            running.discard(future)
            sizes[future] = size(future.result()) if size is not None and future.exception() is None else 0
            held += sizes[future]
        while len(running) < limit and held < max_bytes and (item := next(rest, _END)) is not _END:
            future = pool.submit(fn, item)
            pending.append(future)
            running.add(future)
        if not pending:
            return
        if pending[0] in running:
            wait(running, return_when=FIRST_COMPLETED)
            continue
        head = pending.popleft()
        held -= sizes.pop(head)
        yield head.result()


@contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
