"""Real-time factor (synthesis seconds / audio seconds) of the vocoders on a 10 s input, 1 and 2 CPU threads;
or the training step of a vocoder recipe.

    .venv/bin/python benchmarks/vocoder_speed.py [--seconds 10] [--repeats 3] [--vocoder DIR ...] [--device cpu]
    .venv/bin/python benchmarks/vocoder_speed.py --train-step [--recipe hifigan] [--device cpu] [--threads 2]
        [--data STORE] [--steps 5] [--warmup 2] [--set KEY=VALUE ...] [--sizes] [--json OUT.json]

Vocoders: the default `hifigan` recipe (freshly initialised: speed does not depend on the weights; weight norm
folded as at load time), `griffin-lim` (32 iterations), and any trained vocoder dirs given with --vocoder.
Reports the best of --repeats runs after one warm-up (other processes on a shared machine only slow runs down).

--train-step: steps per second of the trainer's own step (`sqaudio.training.vocoder.VocoderTrainer.step`: a
generator and a discriminator update with the recipe's batch) in steady state, batches through the engine's
DataLoader, on --data or a generated speech store (`sqaudio.data.synthetic` prepared by `sqaudio.data.prepare`);
host syncs per step as in train_speed.py (`host_syncs.py`: counted under CUDA's sync debug mode "warn", the
first located under "error"). --sizes: also the sizes of a full checkpoint and of its `sqaudio vocoder export`
generator-only file (a 1-step `train_vocoder` run).
"""
from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))


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


def speech_store(root: Path, speakers: int = 4, utterances: int = 8, seconds: tuple[float, float] = (1.0, 2.5),
                 workers: int = 1) -> Path:
    """A prepared store of generated speech (`sqaudio.data.synthetic`): real audio files behind every entry."""
    from sqaudio.data.prepare import PrepareOptions, prepare
    from sqaudio.data.synthetic import make_demo_corpus

    make_demo_corpus(root / "corpus", speakers, utterances, seconds)
    prepare(root / "corpus", root / "store", options=PrepareOptions(workers=workers, quiet=True))
    return root / "store"


def train_speed(data: Path, recipe: str, device: str, steps: int, warmup: int, sets: list[str]) -> dict:
    """Steady-state steps per second and host syncs of the vocoder trainer's step on a prepared store."""
    from host_syncs import SyncCounter, cuda_only, first_sync

    from sqaudio.codec.parallel_wavegan import build_discriminator
    from sqaudio.data.store import open_store
    from sqaudio.distributed import Context
    from sqaudio.training import engine
    from sqaudio.training.vocoder import VocoderTrainer, crop_batches, usable_entries
    from sqaudio.training.vocoder_losses import Losses, make_optimizer

    store, cfg, dev = open_store(data), load_vocoder_config(recipe, sets), torch.device(device)
    train, cuda = cfg.train, dev.type == "cuda"
    process = engine.Process(dev, Context(), train.seed)
    process.seed_streams(train.seed)
    generator = build_generator(cfg, store.features).to(dev)
    discriminator = build_discriminator(cfg.discriminator_type, cfg.discriminator_params).to(dev)
    trainer = VocoderTrainer(process, cfg, store, generator, discriminator, Losses(cfg, store.features).to(dev),
                             make_optimizer(generator.parameters(), cfg.generator_optimizer),
                             make_optimizer(discriminator.parameters(), cfg.discriminator_optimizer))
    entries = usable_entries(store, "train", train.batch_frames)
    batches = crop_batches(store, entries, train.batch_size, train.batch_frames, train.seed, train.cache_mb)
    counter, meter = SyncCounter(cuda), engine.Meter(process.ctx)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for s, batch in process.batches(batches, 0, warmup + steps + 1, train.num_workers):
        if s == warmup:
            sync()
            start = time.perf_counter()
            counter.__enter__()
        if s == warmup + steps:  # this batch is kept for the sync probe
            counter.__exit__(None, None, None)
            sync()
            elapsed = time.perf_counter() - start
            break
        loss, values = trainer.step(s, batch)
        meter.add(s, values, loss)
    first = first_sync(lambda s: trainer.step(s, batch), range(warmup + steps, warmup + steps + 3)) if cuda else None
    return {"recipe": recipe, "device": str(dev), "batch_size": train.batch_size, "batch_frames": train.batch_frames,
            "workers": train.num_workers, "threads": torch.get_num_threads(), "steps": steps,
            "steps_per_s": steps / elapsed, "s_per_step": elapsed / steps,
            "python_reads_per_step": counter.reads / steps,
            "cuda_syncs_per_step": cuda_only(cuda, counter.cuda_syncs / steps), "first_sync": cuda_only(cuda, first)}


def checkpoint_sizes(data: Path, recipe: str, device: str) -> dict[str, float]:
    """Sizes (MB) of a full checkpoint of a 1-step run and of its generator-only export."""
    from sqaudio import checkpoint
    from sqaudio.codec.vocoders import export_generator
    from sqaudio.data.store import open_store
    from sqaudio.training.vocoder import train_vocoder

    with tempfile.TemporaryDirectory() as tmp:
        sets = ["train.steps=1", "train.eval_utterances=0", "train.num_workers=0"]
        train_vocoder(open_store(data), Path(tmp) / "run", load_vocoder_config(recipe, sets), device=device,
                      quiet=True)
        full = checkpoint.latest(Path(tmp) / "run")
        export_generator(full, Path(tmp) / "gen.pt")
        return {"full_mb": full.stat().st_size / 1e6, "generator_mb": (Path(tmp) / "gen.pt").stat().st_size / 1e6}


def train_step_main(args) -> None:
    torch.set_num_threads(args.threads[-1])
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or speech_store(Path(tmp))
        result = train_speed(data, args.recipe, args.device, args.steps, args.warmup, args.set)
        if args.sizes:
            result.update(checkpoint_sizes(data, args.recipe, args.device))
    syncs = result["cuda_syncs_per_step"]
    Console().print(f"{args.recipe} on {args.device} ({result['threads']} thread(s)), batch {result['batch_size']} x "
                    f"{result['batch_frames']} frames: {result['steps_per_s']:.3f} steps/s ({result['s_per_step']:.3f} "
                    f"s per step); tensor reads into Python per step {result['python_reads_per_step']:.2f}, "
                    f"CUDA syncs per step {syncs if isinstance(syncs, str) else f'{syncs:.2f}'}", highlight=False)
    if args.sizes:
        Console().print(f"checkpoint {result['full_mb']:.0f} MB, exported generator {result['generator_mb']:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocoder", action="append", default=[], help="Also measure this vocoder dir.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-step", action="store_true", help="Time training steps instead (see above).")
    parser.add_argument("--recipe", default="hifigan")
    parser.add_argument("--data", type=Path, help="--train-step: a prepared store (default: generated speech)")
    parser.add_argument("--steps", type=int, default=5, help="--train-step: timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="--train-step: untimed steps first")
    parser.add_argument("--set", action="append", default=[], help="--train-step: recipe override KEY=VALUE")
    parser.add_argument("--sizes", action="store_true", help="--train-step: also the checkpoint sizes")
    parser.add_argument("--json", type=Path, help="--train-step: also write the result here")
    args = parser.parse_args()
    if args.train_step:
        train_step_main(args)
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
