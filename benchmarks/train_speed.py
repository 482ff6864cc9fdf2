"""Training steps per second and peak memory of the reference-size speech model on this machine.

Each configuration runs in its own process (so peak RSS is its own): SQ-VAE I, SQ-VAE IV and VQ-VAE-EMA
in paper crop mode (batch 52, 32 + 2 frames, 768 channels), and SQ-VAE IV in whole-utterance mode
(batch 16 utterances of 2-6 s, length-bucketed, masked). Synthetic log-mels; the model and loop are real.

    .venv/bin/python benchmarks/train_speed.py [--steps 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "SQ-VAE I (crop)": ["quantizer.variant=1"],
    "SQ-VAE IV (crop)": ["quantizer.variant=4"],
    "VQ-VAE-EMA (crop)": ["quantizer.kind=vq_ema"],
    "SQ-VAE IV (utterance)": ["quantizer.variant=4", "data.mode=utterance", "data.batch_size=16"],
}


def worker(overrides: list[str], steps: int, threads: int) -> dict:
    import torch

    from sqaudio.config import load_recipe
    from sqaudio.sqvae import build_model
    from sqaudio.train import build_optimizer

    torch.set_num_threads(threads)
    recipe = load_recipe("vctk/sqvae_gauss4", ["model.speech.n_speakers=100", *overrides])
    model = build_model(recipe).train()
    opt, _ = build_optimizer(model, recipe)
    g = torch.Generator().manual_seed(0)
    b = recipe.data.batch_size
    if recipe.data.mode == "crop":
        batch = {"mel": torch.rand(b, 80, recipe.data.sample_frames + 2, generator=g),
                 "speaker": torch.randint(0, 100, (b,), generator=g)}
    else:
        lengths = torch.randint(200, 600, (b,), generator=g)
        batch = {"mel": torch.rand(b, 80, int(lengths.max()), generator=g), "lengths": lengths,
                 "speaker": torch.randint(0, 100, (b,), generator=g)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        out = model(batch, temperature=1.0)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"steps_per_s": steps / elapsed, "peak_rss_mb": peak / 1024, "train_rss_growth_mb": (peak - base) / 1024,
            "frames_per_step": int(batch["mel"].shape[0] * batch["mel"].shape[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.steps, args.threads)))
        return
    print(f"reference-size speech SQ-VAE on CPU, {args.threads} threads, {args.steps} timed steps")
    print(f"{'configuration':<24} {'steps/s':>8} {'frames/s':>9} {'peak RSS MB':>12} {'train growth MB':>16}")
    results = {}
    for name, overrides in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(overrides), "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<24} {r['steps_per_s']:>8.3f} {r['steps_per_s'] * r['frames_per_step']:>9.0f} "
              f"{r['peak_rss_mb']:>12.0f} {r['train_rss_growth_mb']:>16.0f}")
    ref = results["SQ-VAE IV (crop)"]["steps_per_s"]
    print("speed ratio vs SQ-VAE IV crop: " + ", ".join(f"{n}: {r['steps_per_s'] / ref:.2f}x" for n, r in results.items()))


if __name__ == "__main__":
    main()
