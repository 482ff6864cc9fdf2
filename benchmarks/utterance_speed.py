"""Time per frame of an SQ-VAE training step in whole-utterance mode against crop mode, for the same model.

A step is forward, backward and Adam on a batch already on the device (the model from
`sqaudio.models.sqvae.build_model` and a recipe loaded by `sqaudio.config.load_recipe`). Crop mode: the recipe's
`data.batch_size` crops of `sample_frames + 2` frames, no lengths (the decoder's plain GRU call). Utterance mode:
`--lengths` utterances padded to the longest, with their lengths (masks, the decoder's per-direction GRU).
Frames counted are the valid input frames of a batch. After a warm-up the two modes alternate round by round
(a round: one utterance step, then as many crop steps as hold about as many frames), so machine noise hits both
alike; the median ms per frame of each is reported, and their ratio (utterance over crop).

    .venv/bin/python benchmarks/utterance_speed.py [--recipes demo/tiny vctk/sqvae_gauss4] [--lengths 600 ...]
        [--rounds 3] [--warmup 1] [--threads 1] [--device cpu] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqaudio.config import load_recipe  # noqa: E402
from sqaudio.models.sqvae import build_model  # noqa: E402

N_SPEAKERS = 4


def batches(recipe, lengths: list[int], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """A crop batch (the recipe's size) and an utterance batch (padded, with lengths) of random log-mels."""
    g = torch.Generator().manual_seed(0)
    n_mels, crops = recipe.features.n_mels, recipe.data.batch_size
    crop = {"mel": torch.rand(crops, n_mels, recipe.data.sample_frames + 2, generator=g),
            "speaker": torch.arange(crops) % N_SPEAKERS}
    mel = torch.rand(len(lengths), n_mels, max(lengths), generator=g)
    for row, n in zip(mel, lengths):
        row[:, n:] = 0.0
    utterance = {"mel": mel, "lengths": torch.tensor(lengths), "speaker": torch.arange(len(lengths)) % N_SPEAKERS}
    return {name: {k: v.to(device) for k, v in b.items()} for name, b in (("crop", crop), ("utterance", utterance))}


def step_seconds(model, optimizer, batch: dict[str, torch.Tensor]) -> float:
    """Wall time of one forward + backward + Adam step."""
    sync = torch.cuda.synchronize if batch["mel"].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    optimizer.step()
    sync()
    return time.perf_counter() - start


def measure(name: str, lengths: list[int], rounds: int, warmup: int, device: torch.device) -> dict:
    """Median ms per frame of both modes, interleaved round by round, for one recipe."""
    recipe = load_recipe(name, [f"model.speech.n_speakers={N_SPEAKERS}"])
    torch.manual_seed(0)
    model = build_model(recipe).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.train.lr)
    data = batches(recipe, lengths, device)
    crop_frames = data["crop"]["mel"].shape[0] * data["crop"]["mel"].shape[-1]
    steps = {"crop": max(1, round(sum(lengths) / crop_frames)), "utterance": 1}  # about equal frames per round
    frames = {"crop": steps["crop"] * crop_frames, "utterance": sum(lengths)}
    per_frame: dict[str, list[float]] = {"crop": [], "utterance": []}
    for i in range(warmup + rounds):
        for mode, values in per_frame.items():
            seconds = sum(step_seconds(model, optimizer, data[mode]) for _ in range(steps[mode]))
            if i >= warmup:
                values.append(1e3 * seconds / frames[mode])
    result = {"recipe": name, "device": str(device), "threads": torch.get_num_threads(), "rounds": rounds}
    for mode, values in per_frame.items():
        result[mode] = {"frames_per_round": frames[mode], "steps_per_round": steps[mode],
                        "ms_per_frame": statistics.median(values)}
    result["ratio"] = result["utterance"]["ms_per_frame"] / result["crop"]["ms_per_frame"]
    return result


def report(result: dict) -> str:
    """One line: both modes' ms per frame and the ratio."""
    crop, utt = result["crop"], result["utterance"]
    return (f"{result['recipe']} ({result['device']}, {result['threads']} threads, "
            f"median of {result['rounds']} rounds): "
            f"crop {crop['ms_per_frame']:.4f} ms/frame ({crop['steps_per_round']} steps, {crop['frames_per_round']} "
            f"frames a round), utterance {utt['ms_per_frame']:.4f} ms/frame ({utt['frames_per_round']} frames), "
            f"ratio {result['ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["demo/tiny", "vctk/sqvae_gauss4"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[600, 580, 560, 540],
                        help="utterance-mode frames per utterance (one batch)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one utterance step and crop steps "
                        "of about as many frames)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared CPU, spinning OpenMP threads swamp the small steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.recipes:
        results.append(measure(name, args.lengths, args.rounds, args.warmup, torch.device(args.device)))
        print(report(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
