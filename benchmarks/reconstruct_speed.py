"""Real-time factor and peak memory of `reconstruct` (read -> codes -> decoder -> vocoder -> wav) by input length.

    .venv/bin/python benchmarks/reconstruct_speed.py [--seconds 10 60 600] [--vocoder hifigan griffin-lim]
                                                     [--threads 2] [--device cpu] [--recipe vctk/sqvae_gauss4]

The input is generated speech (`sqaudio.data.synthetic`, 5 s utterances of one voice back to back).

The SQ-VAE is the recipe's reference-size speech model and `hifigan` the default vocoder recipe, both freshly
initialised (speed and memory do not depend on the weights) and saved as checkpoints, so the measured path is
the command's own: `Codec.load` from a run directory, `Codec.reconstruct_to` (what `sqaudio reconstruct` runs: features
streamed from the file in two passes, models on windows of `CHUNK_SECONDS`, the wav written block by block). Each
(length, vocoder) runs in a fresh process. Memory columns: the peak RSS (ru_maxrss) and that peak after loading
(imports, model, vocoder); the rise of the resident set during `reconstruct_to` (VmHWM reset through
/proc/self/clear_refs, minus VmRSS then), for the first run in the fresh process (it includes one-time costs:
kernel caches, the allocator's heap growing to the windows' sizes) and for the same input run again in that
process (steady state: what anything held per second of input would show in); both must stay flat; the
peak of numpy and Python allocations (with --tracemalloc; torch's CPU allocations are not traced, and tracing
inflates the RSS columns). On CUDA the peak of allocated device memory is reported too.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from host_syncs import cuda_only  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_checkpoints(root: Path, recipe_name: str) -> tuple[Path, Path]:
    """A run dir with a freshly initialised SQ-VAE and a generator-only `hifigan` vocoder checkpoint."""
    import torch

    from sqaudio import checkpoint
    from sqaudio.codec.vocoders import CHECKPOINT_FORMAT, build_generator, load_vocoder_config
    from sqaudio.config import load_recipe, to_dict
    from sqaudio.models.sqvae import build_model

    recipe = load_recipe(recipe_name, ["model.speech.n_speakers=100"])
    torch.manual_seed(0)
    model = build_model(recipe)
    speakers = [f"s{i:03d}" for i in range(100)]
    checkpoint.save({"model": model.state_dict(), "recipe": to_dict(recipe), "features": to_dict(recipe.features),
                     "speakers": speakers, "step": 0}, root / "run" / "checkpoint-0.pt")
    cfg = load_vocoder_config("hifigan")
    generator = build_generator(cfg, recipe.features)
    checkpoint.save({"format": CHECKPOINT_FORMAT, "version": 1, "step": 0, "config": to_dict(cfg),
                     "features": to_dict(recipe.features), "generator": generator.state_dict()},
                    root / "hifigan.pt")
    return root / "run", root / "hifigan.pt"


def child(run: Path, vocoder: str, wav: Path, device: str, threads: int, trace: bool = False) -> dict:
    """One measurement, in this process: load, then `reconstruct_to` (read -> codes -> decoder -> vocoder -> wav)."""
    import tracemalloc

    import torch

    torch.set_num_threads(threads)
    from sqaudio.codec.codec import Codec

    codec = Codec.load(run, vocoder, device)
    loaded = _peak_mb()
    out = wav.with_suffix(".out.wav")
    row: dict = {"after_load_mb": loaded}
    for run_name in ("first", "again"):  # again: the same input in the same process (allocator and caches warm)
        reset = _reset_peak_rss()
        rss0 = _status_mb("VmRSS")
        if trace:
            tracemalloc.start()
        start = time.perf_counter()
        codec.reconstruct_to(wav, out, "s000")
        if codec.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        traced = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
        tracemalloc.stop()
        hwm = _status_mb("VmHWM")
        rise = hwm - rss0 if reset and hwm is not None and rss0 is not None else None
        if run_name == "first":
            row.update({"wall_s": seconds, "peak_mb": _peak_mb(), "rss_rise_mb": rise, "traced_peak_mb": traced,
                        "gpu_peak_mb": cuda_only(codec.device.type == "cuda",
                                                 lambda: torch.cuda.max_memory_allocated() / 2**20)})
        else:
            row.update({"again_wall_s": seconds, "again_rss_rise_mb": rise})
        out.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0, 600.0])
    parser.add_argument("--vocoder", nargs="+", default=["hifigan", "griffin-lim"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipe", default="vctk/sqvae_gauss4")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="Also trace numpy/Python allocations (its bookkeeping adds to the RSS columns).")
    parser.add_argument("--child", nargs=3, metavar=("RUN", "VOCODER", "WAV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run, vocoder, wav = args.child
        print(json.dumps(child(Path(run), vocoder, Path(wav), args.device, args.threads, args.tracemalloc)))
        return
    import soundfile as sf
    from rich.console import Console
    from rich.table import Table

    from sqaudio.data.synthetic import make_voices, synthesize

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run, hifigan = make_checkpoints(Path(tmp), args.recipe)
        vocoders = {"hifigan": str(hifigan), "griffin-lim": "griffin-lim"}
        for seconds in args.seconds:
            wav = Path(tmp) / f"in_{seconds:g}.wav"
            voice = make_voices(1)[0]
            pieces = int(np.ceil(seconds / 5.0))  # generated speech, 5 s utterances back to back
            sf.write(wav, np.concatenate([synthesize(voice, 5.0, seed=i) for i in range(pieces)])
                     [: int(seconds * 16000)], 16000)
            for name in args.vocoder:
                cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
                       "--child", str(run), vocoders[name], str(wav)] + ["--tracemalloc"] * args.tracemalloc
                result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if result.returncode != 0:
                    sys.exit(result.stderr)
                row = {"seconds": seconds, "vocoder": name, **json.loads(result.stdout.strip().splitlines()[-1])}
                row.update({"rtf": row["wall_s"] / seconds, "again_rtf": row["again_wall_s"] / seconds})
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            wav.unlink()
    table = Table(title=f"reconstruct, {args.recipe} + vocoder, device {args.device}, {args.threads} thread(s) "
                        "(real-time factor < 1: faster than real time)")
    for column in ("input", "vocoder", "real-time factor", "peak RSS", "after load", "RSS rise, first run",
                   "RSS rise, again", "numpy/Python peak (tracemalloc)", "GPU peak"):
        table.add_column(column, justify="right")
    for r in rows:
        gpu = f"{r['gpu_peak_mb']:.0f} MB" if isinstance(r["gpu_peak_mb"], float) else "-"
        rise, again = (f"{r[k]:.1f} MB" if r[k] is not None else "-" for k in ("rss_rise_mb", "again_rss_rise_mb"))
        table.add_row(f"{r['seconds']:g} s", r["vocoder"], f"{r['rtf']:.3f} ({r['again_rtf']:.3f} again)",
                      f"{r['peak_mb']:.0f} MB", f"{r['after_load_mb']:.0f} MB", rise, again,
                      f"{r['traced_peak_mb']:.1f} MB" if r["traced_peak_mb"] is not None else "-", gpu)
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
