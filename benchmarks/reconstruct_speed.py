"""Real-time factor of `reconstruct` on the CPU for a 10 s input, split into features / SQ-VAE / vocoder.

    .venv/bin/python benchmarks/reconstruct_speed.py [--seconds 10] [--threads 1 2] [--recipe vctk/sqvae_gauss4]

The SQ-VAE is the reference-size speech model of the recipe and the vocoders are the default `hifigan`
recipe and Griffin-Lim, freshly initialised (speed does not depend on the weights). The audio is read from a
wav file, so the feature stage includes decoding. Best of --repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import harmonic  # noqa: E402
from vocoder_speed import recipe_vocoder  # noqa: E402

from sqaudio.config import load_recipe  # noqa: E402
from sqaudio.features import LogMel, load_audio  # noqa: E402
from sqaudio.sqvae import build_model  # noqa: E402
from sqaudio.vocoder import load_vocoder  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--recipe", default="vctk/sqvae_gauss4")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, ["model.speech.n_speakers=100"])
    cfg = recipe.features
    model = build_model(recipe).eval()
    logmel = LogMel(cfg)
    vocoders = {"hifigan": recipe_vocoder("hifigan", cfg, "cpu"), "griffin-lim": load_vocoder("griffin-lim", "cpu", cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.wav"
        sf.write(path, harmonic(args.seconds, rate=cfg.sample_rate), cfg.sample_rate)
        mel = logmel(torch.from_numpy(load_audio(path, cfg))[None])
        mel = mel[..., : mel.shape[-1] - mel.shape[-1] % 2]
        speaker = torch.zeros(1, dtype=torch.long)
        table = Table(title=f"reconstruct real-time factor, {args.seconds:g} s input, CPU (< 1: faster than real time)")
        table.add_column("stage")
        for n in args.threads:
            table.add_column(f"{n} thread{'s' * (n > 1)}", justify="right")
        rows: dict[str, list[float]] = {}
        for n in args.threads:
            torch.set_num_threads(n)
            with torch.inference_mode():
                stage = {"features (read + log-mel)": best_of(lambda: logmel(torch.from_numpy(load_audio(path, cfg))[None]), args.repeats),
                         "SQ-VAE (encode + decode)": best_of(lambda: model.decode(model.quantizer.lookup(model.encode({"mel": mel})[0]), speaker), args.repeats)}
                for name, vocoder in vocoders.items():
                    stage[f"vocoder: {name}"] = best_of(lambda v=vocoder: v.synthesize(mel), args.repeats)
            stage["total with hifigan"] = sum(v for k, v in stage.items() if "griffin" not in k)
            stage["total with griffin-lim"] = sum(v for k, v in stage.items() if "hifigan" not in k and "total" not in k)
            for name, seconds in stage.items():
                rows.setdefault(name, []).append(seconds / args.seconds)
        for name, values in rows.items():
            table.add_row(name, *[f"{v:.3f}" for v in values])
        Console().print(table)


if __name__ == "__main__":
    main()
