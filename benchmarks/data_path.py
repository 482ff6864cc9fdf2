"""Host time of one training batch (`StepBatches[step]`): utterances read file by file vs from the split's pack.

A synthetic store in the real format (`train_speed.synthetic_store`: manifest, one float32 .npy per utterance) is
written to a temporary folder; `speech_batches(..., packed=False)` reads every item's own .npy (what a store that
cannot be written gets), `packed=True` builds packed/train.npy once (timed) and slices its memory map. Both give
the same batches (checked on the first steps). The two are timed in alternating rounds over the same steps, one
process, one torch thread (a DataLoader worker's view); the number is the median of the rounds' ms per batch.

    .venv/bin/python benchmarks/data_path.py                        # vctk/sqvae_gauss4: 52 crops of 34 frames
    .venv/bin/python benchmarks/data_path.py --mode utterance --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_speed import synthetic_store  # noqa: E402

from sqaudio.config import load_recipe  # noqa: E402
from sqaudio.data.batches import StepBatches, speech_batches  # noqa: E402
from sqaudio.data.store import open_store  # noqa: E402


def ms_per_batch(batches: StepBatches, steps: range) -> float:
    start = time.perf_counter()
    for step in steps:
        batches[step]
    return (time.perf_counter() - start) / len(steps) * 1e3


def same_batches(a: StepBatches, b: StepBatches, steps: range) -> bool:
    return all(all(torch.equal(a[s][k], b[s][k]) for k in a[s]) for s in steps)


def measure(recipe: str, mode: str, batches: int, rounds: int, utterances: int) -> dict:
    cfg = load_recipe(recipe, [f"data.mode={mode}"]).data
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(synthetic_store(Path(tmp) / "store", n_speakers=10, n_utts=utterances // 10))
        per_file = speech_batches(store, cfg, store.speakers, seed=0, packed=False)
        start = time.perf_counter()
        packed = speech_batches(store, cfg, store.speakers, seed=0, packed=True)
        build_s = time.perf_counter() - start
        assert same_batches(per_file, packed, range(3)), "the packed path gave other batches"
        ms_per_batch(per_file, range(10)), ms_per_batch(packed, range(10))  # warm-up: page cache, permutations
        times: dict[str, list[float]] = {"per_file": [], "packed": []}
        for r in range(rounds):
            steps = range(10 + r * batches, 10 + (r + 1) * batches)
            times["per_file"].append(ms_per_batch(per_file, steps))
            times["packed"].append(ms_per_batch(packed, steps))
        frames = sum(e["frames"] for e in store.split("train"))
    result = {name: round(statistics.median(values), 3) for name, values in times.items()}
    return {"recipe": recipe, "mode": mode, "batch_size": cfg.batch_size, "sample_frames": cfg.sample_frames,
            "utterances": len(store.entries), "frames": frames, "batches_per_round": batches, "rounds": rounds,
            "per_file_ms": result["per_file"], "packed_ms": result["packed"],
            "speedup": round(result["per_file"] / result["packed"], 2), "pack_build_s": round(build_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="vctk/sqvae_gauss4")
    parser.add_argument("--mode", default="crop", choices=["crop", "utterance"])
    parser.add_argument("--batches", type=int, default=100, help="batches per round and path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--utterances", type=int, default=300, help="utterances in the synthetic store")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.recipe, args.mode, args.batches, args.rounds, args.utterances)
    print(f"{result['recipe']} {result['mode']}: batch {result['batch_size']}, {result['utterances']} utterances; "
          f"per-file {result['per_file_ms']:.3f} ms/batch, packed {result['packed_ms']:.3f} ms/batch, "
          f"{result['speedup']:.1f}x (pack built in {result['pack_build_s']:.2f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
