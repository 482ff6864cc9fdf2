"""Feature-preparation speed: seconds of audio per wall-clock second, `sqaudio prepare` vs the reference's recipe.

The baseline is the reference code's way (sony/sqvae speech/preprocess.py): per file librosa.load + scipy lfilter +
librosa.feature.melspectrogram + amplitude_to_db + np.save, over a process pool (in-process for one worker).
Both sides are timed end to end (pool start-up, reading, writing), on the same files and worker counts.

    .venv/bin/python benchmarks/prepare_speed.py [--data ../shared/data/vctk-mini] [--workers 1,all] [--repeat 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "vctk-mini"


def librosa_reference(job: tuple[str, str]) -> float:
    """One file the reference way; returns its duration in seconds."""
    import librosa
    import scipy.signal

    path, out = job
    wav, _ = librosa.load(path, sr=16000)
    wav = wav / np.abs(wav).max() * 0.999
    mel = librosa.feature.melspectrogram(y=scipy.signal.lfilter([1, -0.97], [1], wav), sr=16000, n_fft=2048,
                                         n_mels=80, hop_length=160, win_length=400, fmin=50, power=1,
                                         pad_mode="reflect")
    logmel = librosa.amplitude_to_db(mel, top_db=80) / 80 + 1
    np.save(out, logmel)
    return len(wav) / 16000


def _init_baseline() -> None:
    import librosa  # noqa: F401  (the reference's workers import it once each)


def run_baseline(files: list[Path], out: Path, workers: int) -> float:
    """Seconds of audio processed by the librosa baseline (the files go to `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(f), str(out / f"{f.stem}.npy")) for f in files]
    if workers == 1:
        return sum(librosa_reference(job) for job in jobs)
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_baseline) as pool:
        return sum(pool.map(librosa_reference, jobs))


def run_ours(data: Path, out: Path, workers: int) -> float:
    from sqaudio.data.prepare import PrepareOptions, prepare
    from sqaudio.data.store import open_store

    prepare(data, out, options=PrepareOptions(workers=workers, quiet=True))
    return sum(e["duration_s"] for e in open_store(out).entries)


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    audio = fn(*args)
    return audio, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus folder (any layout prepare reads)")
    parser.add_argument("--workers", default="1,all", help="comma-separated worker counts; 'all' = every core")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; the fastest is reported")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no corpus at {args.data} (give --data)")
    sys.path.insert(0, str(REPO))
    import librosa  # noqa: F401  (import cost is not the baseline's fault)
    import torch

    from sqaudio.data.corpora import list_corpus
    from sqaudio.data.prepare import default_workers

    torch.set_num_threads(1)
    files = [u.path for u in list_corpus(args.data).utterances]
    counts = [default_workers() if w == "all" else int(w) for w in args.workers.split(",")]
    print(f"{len(files)} files from {args.data}, {os.cpu_count()} CPUs visible, torch {torch.__version__}")
    print(f"{'workers':>7} {'method':>8} {'audio s':>9} {'wall s':>8} {'audio s / s':>12} {'ours / librosa':>15}")
    for workers in counts:
        speeds = {}
        for name, fn in (("librosa", lambda o: run_baseline(files, o, workers)),
                         ("sqaudio", lambda o: run_ours(args.data, o, workers))):
            best = None
            for _ in range(args.repeat):
                tmp = Path(tempfile.mkdtemp(prefix="prepare_speed_"))
                try:
                    audio, wall = timed(fn, tmp / "out")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                best = (audio, wall) if best is None or wall < best[1] else best
            audio, wall = best
            speeds[name] = audio / wall
            ratio = f"{speeds['sqaudio'] / speeds['librosa']:.2f}x" if name == "sqaudio" else ""
            print(f"{workers:>7} {name:>8} {audio:>9.1f} {wall:>8.2f} {audio / wall:>12.1f} {ratio:>15}", flush=True)


if __name__ == "__main__":
    main()
