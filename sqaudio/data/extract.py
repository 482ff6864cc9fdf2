"""Feature extraction for `prepare`: utterances -> feature files in the store, each giving a manifest entry or a skip.

On the CPU each utterance is one job (in-process for one worker, else a forkserver process pool with one torch
thread per worker). On an accelerator a thread pool reads and resamples audio a bounded window ahead while the
features are computed there in batches. Audio that cannot give a valid feature is skipped with its reason, never a
crash; an error writing the output (e.g. a full disk) is raised.
"""
from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from sqaudio.config import FeatureConfig
from sqaudio.data.audio import AudioError, load_audio
from sqaudio.data.corpora import Utterance
from sqaudio.data.features import LogMel, log_mel_spectrogram
from sqaudio.data.store import feature_path, write_feature

MIN_FRAMES = 4  # the speech encoder needs 4 frames for one latent
DEVICE_BATCH = 32  # utterances per feature batch on an accelerator


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
                       device: torch.device) -> Iterator[Result]:
    """Audio is read and resampled by a thread pool, at most 2 batches ahead (bounded memory); features are
    computed on `device` in batches. On an error or Ctrl-C the queued reads are cancelled at once."""
    log_mel = LogMel(cfg).to(device)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        batch: list[tuple[Utterance, np.ndarray]] = []
        for utt, wav in read_ahead(pool, todo, lambda u: (u, _load(u, cfg)), 2 * DEVICE_BATCH + workers):
            if isinstance(wav, Result):
                yield wav
                continue
            batch.append((utt, wav))
            if len(batch) == DEVICE_BATCH:
                yield from _store_batch(batch, log_mel, out_dir, cfg)
                batch = []
        yield from _store_batch(batch, log_mel, out_dir, cfg)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # waits only for the reads already running


def read_ahead(pool, items: list, fn, limit: int) -> Iterator[Any]:
    """fn(item) for every item, in order, computed by `pool` with at most `limit` results not yet taken."""
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


def _store_batch(batch: list[tuple[Utterance, np.ndarray]], log_mel: LogMel, out_dir: Path,
                 cfg: FeatureConfig) -> Iterator[Result]:
    if not batch:
        return
    device = log_mel.fbank.device
    mels = log_mel.batch([torch.from_numpy(wav).to(device) for _, wav in batch])
    for (utt, wav), mel in zip(batch, mels):
        yield _store(utt, out_dir, cfg, wav, lambda m=mel: m.float().cpu().numpy())


@contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
