"""Time of `sqaudio.evaluation.abx.abx_errors` (every triplet, by context, within and across speakers) on a
synthetic item set of a chosen length: 10 speakers x 5 s utterances, phones from a bigram model (40 phones,
Zipf-like frequencies), 80 ms mean phone, codes at 50 Hz (K=512) drawn around one code per phone.

    .venv/bin/python benchmarks/abx_speed.py [--hours 1.0] [--distance codes symbols] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqaudio.evaluation.abx import abx_errors, code_frames, symbol_frames  # noqa: E402
from sqaudio.evaluation.items import frame_spans, read_items  # noqa: E402

PHONES, CODES, SPEAKERS, SECONDS, RATE = 40, 512, 10, 5.0, 50


def phone_sequence(rng: np.random.Generator, bigram: np.ndarray) -> list[tuple[int, float, float]]:
    """(phone, onset, offset) of one utterance of SECONDS seconds: gamma durations, phones from the bigram."""
    t, phones, p = 0.0, [], int(rng.integers(PHONES))
    while t < SECONDS:
        d = max(0.03, rng.gamma(4, 0.02))
        phones.append((p, t, t + d))
        t, p = t + d, int(rng.choice(PHONES, p=bigram[p]))
    return phones


def item_lines(name: str, phones: list[tuple[int, float, float]], speaker: int) -> list[str]:
    """The .item lines of an utterance's phones that have both neighbours and end inside it."""
    lines = []
    for k in range(1, len(phones) - 1):
        p, on, off = phones[k]
        if off <= SECONDS:
            lines.append(f"{name} {on:.4f} {off:.4f} p{p} p{phones[k - 1][0]} p{phones[k + 1][0]} S{speaker}")
    return lines


def synthetic_set(hours: float, folder: Path, seed: int = 0) -> tuple[Path, list[torch.Tensor]]:
    """An item file in `folder` and the (frames,) code sequence of each of its files."""
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, PHONES + 1)
    bigram = rng.dirichlet(np.full(PHONES, 0.3), size=PHONES) * weights
    bigram /= bigram.sum(1, keepdims=True)
    centre = rng.integers(0, CODES, PHONES)
    frames = int(SECONDS * RATE)
    lines, codes = ["#file onset offset #phone prev-phone next-phone speaker"], []
    for s in range(SPEAKERS):
        for u in range(int(hours * 3600 / SECONDS / SPEAKERS)):
            phones = phone_sequence(rng, bigram)
            c = np.zeros(frames, dtype=np.int64)
            for p, on, off in phones:
                a, b = int(on * RATE), min(frames, int(np.ceil(off * RATE)))
                c[a:b] = (centre[p] + rng.integers(-3, 4, b - a) * (rng.random(b - a) < 0.5)) % CODES
            codes.append(torch.as_tensor(c))
            lines += item_lines(f"s{s}_{u}", phones, s)
    path = folder / "synthetic.item"
    path.write_text("\n".join(lines) + "\n")
    return path, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--distance", nargs="+", default=["codes", "symbols"], choices=["codes", "symbols"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        item_path, codes = synthetic_set(args.hours, Path(tmp))
        items = read_items(item_path)
    spans = frame_spans(items, np.full(len(items.files), int(SECONDS * RATE)), RATE, 0.015)
    print(f"{args.hours} h: {len(items)} items, {len(items.files)} files, {len(items.contexts)} contexts")
    codebook = torch.randn(CODES, 64, generator=torch.Generator().manual_seed(0))
    build = {"codes": lambda: code_frames(codes, codebook), "symbols": lambda: symbol_frames(codes, CODES)}
    results = {"hours": args.hours, "items": len(items)}
    for name in args.distance:
        start = time.perf_counter()
        with Progress(transient=True) as progress:
            scores = abx_errors(build[name](), items, spans, progress, name)
        seconds = time.perf_counter() - start
        results[name] = {**scores, "seconds": seconds}
        print(f"{name}: {json.dumps(scores)} in {seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
