"""Training steps per second of the reference recipe through the engine's DataLoader, against the same model
on a batch already on the device; the data path's share of a step; host syncs per steady-state step.

The step is the trainer's own (`sqaudio.training.sqvae.SQVAETrainer.step`: autocast, keyed noise, backward, clip,
Adam, the LR schedule, on-device statistics); batches come from a prepared store through `Process.batches` (workers, pinned memory,
non-blocking copies). Without --data a synthetic store in the real format is written to a temporary folder
(random log-mels; the loader reads .npy files exactly as from `sqaudio prepare`).

Host syncs (`host_syncs.py`) are counted over the DataLoader steps two ways: reads of a tensor's value into
Python made by sqaudio's code (on a CPU run, the reads that could block on an accelerator; torch's Adam reads its
step counters, which it keeps on the CPU for exactly that reason, and is not counted) and, on CUDA, the
synchronisations CUDA itself reports (`torch.cuda.set_sync_debug_mode("warn")`). On CUDA three more steps on the
in-memory batch run under sync debug mode "error", which names the source line of the first sync (`first_sync`:
null when there is none). CUDA-only fields read "skipped: cpu" on a CPU run.

    .venv/bin/python benchmarks/train_speed.py [--steps 20] [--workers 2] [--device cpu] [--amp none]
    python3 benchmarks/train_speed.py --device cuda --amp bf16 --steps 300 --json $OUT/train_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_syncs import SyncCounter, cuda_only, first_sync  # noqa: E402


def synthetic_store(root: Path, n_speakers: int = 10, n_utts: int = 30, frames: tuple[int, int] = (150, 600),
                    seed: int = 0) -> Path:
    """A prepared store (manifest, feature_config.json, speakers.json, features/*.npy) of random log-mels."""
    from sqaudio.config import FeatureConfig
    from sqaudio.data.store import feature_config_json

    rng = np.random.default_rng(seed)
    cfg, lines = FeatureConfig(), []
    speakers = [f"s{i:03d}" for i in range(n_speakers)]
    for spk in speakers:
        for u in range(n_utts):
            n = int(rng.integers(*frames))
            rel = f"features/train/{spk}/{spk}_{u}.npy"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / rel, rng.random((cfg.n_mels, n), dtype=np.float32))
            lines.append({"id": f"{spk}_{u}", "speaker": spk, "split": "train", "source": f"/synthetic/{spk}_{u}.wav",
                          "features": rel, "frames": n, "duration_s": n / cfg.frame_rate})
    (root / "feature_config.json").write_text(feature_config_json(cfg))
    (root / "speakers.json").write_text(json.dumps(speakers))
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def measure(args) -> dict:
    import torch

    from sqaudio.config import load_recipe
    from sqaudio.distributed import Context
    from sqaudio.models.sqvae import build_model
    from sqaudio.training import engine
    from sqaudio.training.sqvae import SQVAETrainer, build_optimizer, load_training_data

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    overrides = [f"train.amp={args.amp}", "model.speech.n_speakers=0", *args.set]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    recipe = load_recipe(args.recipe, overrides)
    data = load_training_data(recipe, args.data)
    import dataclasses
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, speech=dataclasses.replace(
        recipe.model.speech, n_speakers=len(data.speakers))))
    process = engine.Process(dev, Context(), recipe.train.seed)
    model = build_model(recipe).to(dev).train()
    optimizer, scheduler = build_optimizer(model, recipe)
    warm, steps = args.warmup, args.steps
    trainer = SQVAETrainer(process, model, optimizer, scheduler, data, recipe, warm + steps + 3)
    meter = engine.Meter(process.ctx)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def loop(batches, count: SyncCounter | None = None) -> float:
        start = None
        for s, batch in batches:
            if s == warm:
                sync()
                start = time.perf_counter()
                if count is not None:
                    count.__enter__()
            loss, values = trainer.step(s, batch)
            meter.add(s, values, loss)
        if count is not None:
            count.__exit__(None, None, None)
        sync()
        elapsed = time.perf_counter() - start
        meter.read(warm + steps, Path(tempfile.gettempdir()))
        return steps / elapsed

    t0 = time.perf_counter()
    for s in range(20):
        data.batches[s]
    host_ms = (time.perf_counter() - t0) / 20 * 1000  # building one batch in one process (what workers hide)
    cuda = dev.type == "cuda"
    counter = SyncCounter(cuda)
    fixed = engine.to_device(data.batches[0], dev)
    before = loop((s, fixed) for s in range(warm + steps))  # in memory before and after: no order effect
    loader_rate = loop(process.batches(data.batches, 0, warm + steps, recipe.data.num_workers), counter)
    memory_rate = (before + loop((s, fixed) for s in range(warm + steps))) / 2
    first = first_sync(lambda s: trainer.step(s, fixed), range(warm + steps, warm + steps + 3)) if cuda else None
    return {"recipe": recipe.name, "device": str(dev), "amp": recipe.train.amp if cuda else "none (cpu)",
            "mode": recipe.data.mode, "batch_size": recipe.data.batch_size, "frames": recipe.data.sample_frames + 2,
            "workers": recipe.data.num_workers, "threads": args.threads, "steps": steps,
            "loader_steps_per_s": loader_rate, "in_memory_steps_per_s": memory_rate,
            "data_path_share": 1.0 - loader_rate / memory_rate, "host_ms_per_batch": host_ms,
            "python_reads_per_step": counter.reads / steps,
            "cuda_syncs_per_step": cuda_only(cuda, counter.cuda_syncs / steps), "first_sync": cuda_only(cuda, first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="vctk/sqvae_gauss4")
    parser.add_argument("--data", type=Path, help="a prepared store (default: a synthetic one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="bf16", help="none|bf16|fp16 (applies on CUDA only)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="extra recipe override")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = synthetic_store(Path(tmp) / "store")
        result = measure(args)
    print(f"{result['recipe']} on {result['device']} (amp {result['amp']}), batch {result['batch_size']} x "
          f"{result['frames']} frames, {result['workers']} workers, {result['threads']} threads, {args.steps} steps")
    print(f"  through the DataLoader: {result['loader_steps_per_s']:.2f} steps/s")
    print(f"  batch already in memory: {result['in_memory_steps_per_s']:.2f} steps/s")
    print(f"  data path share of a step: {100 * result['data_path_share']:.1f}%  (building a batch in one process: "
          f"{result['host_ms_per_batch']:.1f} ms)")
    print(f"  tensor reads into Python per steady-state step: {result['python_reads_per_step']:.2f}")
    if args.device != "cpu":
        print(f"  CUDA synchronisations per steady-state step: {result['cuda_syncs_per_step']:.2f}; first: "
              f"{result['first_sync']['where'] if result['first_sync'] else 'none'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
