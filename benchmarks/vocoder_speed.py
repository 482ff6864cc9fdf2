"""Real-time factor (synthesis seconds / audio seconds) of the vocoders on a 10 s input, 1 and 2 CPU threads.

    .venv/bin/python benchmarks/vocoder_speed.py [--seconds 10] [--repeats 3] [--vocoder DIR ...] [--device cpu]

Vocoders: the default `hifigan` recipe (freshly initialised: speed does not depend on the weights; weight norm
folded as at load time), `griffin-lim` (32 iterations), and any trained vocoder dirs given with --vocoder.
Reports the best of --repeats runs after one warm-up (other processes on a shared machine only slow runs down).
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from sqaudio.config import FeatureConfig
from sqaudio.vocoder import MelConvention, NeuralVocoder, Vocoder, build_generator, load_vocoder, load_vocoder_config


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocoder", action="append", default=[], help="Also measure this vocoder dir.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
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
