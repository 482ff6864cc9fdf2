"""Real-time factor (synthesis seconds / audio seconds) of the vocoders on a 10 s input, 1 and 2 CPU threads.

    .venv/bin/python benchmarks/vocoder_speed.py [--seconds 10] [--repeats 3] [--vocoder DIR ...] [--device cpu]
    .venv/bin/python benchmarks/vocoder_speed.py --train-step [--recipe hifigan] [--device cpu] [--threads 2]

Vocoders: the default `hifigan` recipe (freshly initialised: speed does not depend on the weights; weight norm
folded as at load time), `griffin-lim` (32 iterations), and any trained vocoder dirs given with --vocoder.
Reports the best of --repeats runs after one warm-up (other processes on a shared machine only slow runs down).

--train-step: seconds per training step of `sqaudio vocoder train` with the recipe's own batch (difference of a
4-step and a 1-step run on a small generated store, so set-up and the first checkpoint cancel out), and the
sizes of a full checkpoint and of its `sqaudio vocoder export` generator-only file.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sqaudio.codec.mel_conventions import MelConvention
from sqaudio.codec.vocoders import (
    NeuralVocoder,
    Vocoder,
    build_generator,
    load_vocoder,
    load_vocoder_config,
)
from sqaudio.config import FeatureConfig


def recipe_vocoder(name: str, features: FeatureConfig, device: str) -> Vocoder:
    generator = build_generator(load_vocoder_config(name), features)
    generator.remove_weight_norm()
    return NeuralVocoder(generator, MelConvention.of(features), features, device, f"recipe {name} (untrained)")


def real_time_factor(vocoder: Vocoder, mel: torch.Tensor, seconds: float, repeats: int) -> float:
    vocoder.synthesize(mel[..., :100])  # warm-up (allocations, kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        vocoder.synthesize(mel)
        if vocoder.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / seconds


def train_step(recipe: str, device: str) -> dict[str, float]:
    """Seconds per step and checkpoint sizes (MB) of a recipe, on a generated 16 kHz store."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from factories import make_store  # generated utterances with real audio files

    from sqaudio import checkpoint
    from sqaudio.codec.vocoders import export_generator
    from sqaudio.data.store import open_store
    from sqaudio.training.vocoder import train_vocoder

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(make_store(Path(tmp) / "store", rate=16000))
        for steps in (1, 4):
            out = Path(tmp) / f"run{steps}"
            sets = [f"train.steps={steps}", "train.checkpoint_every=1000000", "train.eval_utterances=0",
                    "train.num_workers=0", "train.log_every=1"]
            start = time.perf_counter()
            train_vocoder(store, out, load_vocoder_config(recipe, sets), device=device, quiet=True)
            times[steps] = time.perf_counter() - start
        full = checkpoint.latest(Path(tmp) / "run4")
        export_generator(full, Path(tmp) / "gen.pt")
        return {"s_per_step": (times[4] - times[1]) / 3, "full_mb": full.stat().st_size / 1e6,
                "generator_mb": (Path(tmp) / "gen.pt").stat().st_size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocoder", action="append", default=[], help="Also measure this vocoder dir.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-step", action="store_true", help="Time training steps instead (see above).")
    parser.add_argument("--recipe", default="hifigan")
    args = parser.parse_args()
    if args.train_step:
        torch.set_num_threads(args.threads[-1])
        result = train_step(args.recipe, args.device)
        Console().print(f"{args.recipe} on {args.device} ({args.threads[-1]} thread(s)): "
                        f"{result['s_per_step']:.2f} s per training step; checkpoint {result['full_mb']:.0f} MB, "
                        f"exported generator {result['generator_mb']:.1f} MB")
        return
    features = FeatureConfig()
    frames = int(args.seconds * features.frame_rate) + 1
    mel = torch.rand(1, features.n_mels, frames, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    vocoders = {"hifigan (default recipe)": recipe_vocoder("hifigan", features, args.device),
                "griffin-lim (32 it.)": load_vocoder("griffin-lim", args.device, features)}
    for path in args.vocoder:
        vocoders[path] = load_vocoder(path, args.device, features)
    table = Table(title=f"vocoder real-time factor, {args.seconds:g} s input, device {args.device} "
                        "(lower is faster; < 1 is faster than real time)")
    table.add_column("vocoder")
    for threads in args.threads:
        table.add_column(f"{threads} thread{'s' * (threads > 1)}", justify="right")
    rows = {name: [] for name in vocoders}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, vocoder in vocoders.items():
            rows[name].append(f"{real_time_factor(vocoder, mel, args.seconds, args.repeats):.3f}")
    for name, cells in rows.items():
        table.add_row(name, *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
