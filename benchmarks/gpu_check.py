"""The parts of benchmarks/gpu_check.sh that are not benchmarks of their own, and its JSON record.

    python3 benchmarks/gpu_check.py install --site DIR [--wheels .whl]   # wheels for what this Python lacks
    python3 benchmarks/gpu_check.py preflight [--cpu] --json OUT.json     # versions, devices, imports per part
    python3 benchmarks/gpu_check.py inputs DIR [--cpu] --json OUT.json    # the stores the other parts read
    python3 benchmarks/gpu_check.py exactness --data STORE [--cpu] --json OUT.json
    python3 benchmarks/gpu_check.py ddp --data STORE [--cpu] --json OUT.json
    python3 benchmarks/gpu_check.py begin RESULTS.json MODE BUDGET_S          # a new results file
    python3 benchmarks/gpu_check.py record RESULTS.json PART STATUS SECONDS EXIT_CODE [PART.json [PART.log]]
    python3 benchmarks/gpu_check.py finish RESULTS.json WALL_S

`install`, `begin`, `record` and `finish` do not import torch (they run fast and work where torch is broken).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))


class PartFailed(Exception):
    """A part that could not measure what it should: one line for the log, and what it found for the JSON."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


# Top-level modules the parts import that a bare image may lack (checked without importing them).
NEEDED = ("torch", "torchaudio", "numpy", "scipy", "yaml", "typer", "rich", "matplotlib", "h5py", "filelock",
          "tensorboard", "soundfile", "_cffi_backend", "librosa", "decorator", "pooch", "platformdirs",
          "parallel_wavegan")
# What each part imports (imported for real by the preflight).
PART_IMPORTS = {
    "inputs": ["sqaudio.data.prepare", "sqaudio.data.synthetic"],
    "train": ["sqaudio.training.sqvae", "sqaudio.training.engine", "sqaudio.models.sqvae"],
    "vocoder": ["sqaudio.training.vocoder", "sqaudio.codec.parallel_wavegan", "librosa.filters"],
    "reconstruct": ["sqaudio.codec.codec", "soundfile"],
    "ddp": ["sqaudio.cli", "torch.distributed"],
}


# ------------------------------------------------------------------ install (no torch)

def missing_modules() -> list[str]:
    importlib.invalidate_caches()
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def install(site: Path, wheels: Path) -> dict:
    """Install every wheel in `wheels` into `site` (on PYTHONPATH) when this Python lacks a needed module."""
    before = missing_modules()
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    result = {"missing_before": before, "wheels": [w.name for w in found], "site": str(site)}
    if before and found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, found)], check=True)
        sys.path.insert(0, str(site))
    result["missing"] = missing_modules()
    if result["missing"]:
        hint = "not in .whl/" if found else "no .whl/"
        raise PartFailed(f"missing: {', '.join(result['missing'])} ({hint}; run benchmarks/gpu_wheels.sh where pip "
                         f"reaches PyPI and carry .whl)", result)
    return result


# ------------------------------------------------------------------ preflight

def preflight(cpu: bool) -> dict:
    """Python, torch, CUDA and its devices, and the imports of every part; fails in one line on a missing piece."""
    import torch

    result = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
              "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(), "mode": "cpu" if cpu else "cuda"}
    if not cpu and result["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        x = torch.randn(256, 256, device="cuda")
        result.update({"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                       "cudnn": torch.backends.cudnn.version(), "matmul_ok": bool(torch.isfinite(x @ x).all())})
    errors = {}
    for part, modules in PART_IMPORTS.items():
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as err:  # any import failure is the finding: report it, check the rest
                errors[f"{part}: {module}"] = f"{type(err).__name__}: {err}"
    versions = {}
    for name in ("numpy", "scipy", "torchaudio", "soundfile", "librosa", "parallel_wavegan"):
        module = sys.modules.get(name)
        versions[name] = getattr(module, "__version__", None) if module else None
    result.update({"versions": versions, "import_errors": errors})
    problems = [f"{k} ({v})" for k, v in errors.items()]
    if not cpu and not result["cuda_available"]:
        problems.insert(0, "CUDA is not available to torch")
    if problems:
        raise PartFailed("preflight: " + "; ".join(problems), result)
    return result


# ------------------------------------------------------------------ inputs

def inputs(root: Path, cpu: bool) -> dict:
    """A synthetic store in the real format (train_speed.synthetic_store) for the SQ-VAE parts and a prepared
    store of generated speech (vocoder_speed.speech_store: audio behind every entry) for the vocoder."""
    from train_speed import synthetic_store
    from vocoder_speed import speech_store

    from sqaudio.data.store import open_store

    if cpu:
        train = synthetic_store(root / "train", n_speakers=3, n_utts=6, frames=(60, 140), seed=0)
        speech = speech_store(root / "speech", speakers=2, utterances=3, seconds=(0.6, 1.0))
    else:
        train = synthetic_store(root / "train", n_speakers=10, n_utts=30, frames=(150, 600), seed=0)
        speech = speech_store(root / "speech", speakers=4, utterances=10, seconds=(1.0, 2.5))
    out = {}
    for name, path in (("train", train), ("speech", speech)):
        store = open_store(path)
        out[name] = {"path": str(path), "utterances": len(store.entries), "speakers": len(store.speakers),
                     "frames": sum(int(e["frames"]) for e in store.entries)}
    return out


# ------------------------------------------------------------------ exactness

def exactness(data: Path, recipe_name: str, steps: int, sets: list[str], device: str) -> dict:
    """Under train.deterministic=true: a rerun, and `steps // 2` steps then --resume to `steps`, against one
    straight run of `steps` (final weights compared tensor by tensor)."""
    import torch

    from sqaudio import checkpoint
    from sqaudio.config import load_recipe
    from sqaudio.training.sqvae import train

    def run(out: Path, n: int, resume: bool = False) -> dict:
        recipe = load_recipe(recipe_name, [f"train.steps={n}", "train.checkpoint_every=100000", "train.log_every=10",
                                           "train.deterministic=true", *sets])
        train(recipe, data, out, resume=resume, device=device, quiet=True)
        return checkpoint.load(checkpoint.latest(out))["model"]

    def compare(a: dict, b: dict) -> dict:
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in differ
                    if a[k].is_floating_point()), default=0.0)
        return {"bit_exact": not differ, "max_abs_diff": diff, "differing_tensors": differ[:5]}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        straight, again = run(tmp / "a", steps), run(tmp / "b", steps)
        run(tmp / "c", steps // 2)
        resumed = run(tmp / "c", steps, resume=True)
    return {"recipe": recipe_name, "device": device, "steps": steps, "resumed_at": steps // 2,
            "rerun": compare(straight, again), "resume": compare(straight, resumed)}


# ------------------------------------------------------------------ DDP

def ddp(data: Path, recipe: str, steps: int, sets: list[str], cpu: bool) -> dict:
    """Two processes against one at the same global batch: on CUDA with two GPUs or more; otherwise on the CPU
    (gloo), and on a one-GPU machine also the one-line error of `--devices 2 --device cuda`."""
    import torch
    from ddp_scaling import run

    gpus = 0 if cpu else torch.cuda.device_count()
    device = "cuda" if gpus >= 2 else "cpu"
    result: dict = {"gpus": gpus, "device": device, "recipe": recipe, "steps": steps}
    if not cpu and gpus < 2:
        result["two_on_one_gpu"] = launch_error(data, recipe)
    with tempfile.TemporaryDirectory() as tmp:
        rates = {n: run(data, Path(tmp) / f"run{n}", n, steps, recipe, device, sets) for n in (1, 2)}
    result.update({"steps_per_s": rates, "scaling_2_vs_1": rates[2] / rates[1]})
    return result


def launch_error(data: Path, recipe: str) -> dict:
    """`sqaudio train --devices 2 --device cuda` on one GPU: its exit code and its error lines."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sqaudio", "train", recipe, "--data", str(data), "--out", str(Path(tmp) / "run"),
               "--devices", "2", "--device", "cuda", "--quiet", "--set", "train.steps=2"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"exit_code": done.returncode, "error_lines": len(lines), "error": lines[-3:],
            "one_line": done.returncode == 2 and len(lines) == 1}


# ------------------------------------------------------------------ the record (no torch)

def write_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def begin(results: Path, mode: str, budget: int) -> None:
    write_atomic(results, {"mode": mode, "budget_s": budget, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "host": platform.node(), "finished": False, "wall_s": None, "failed": [], "parts": {}})


def finish(results: Path, wall: int) -> None:
    doc = json.loads(results.read_text())
    write_atomic(results, {**doc, "finished": True, "wall_s": wall})

def record(results: Path, part: str, status: str, seconds: int, exit_code: int, part_json: Path | None,
           log: Path | None) -> str:
    """Add one part to the results file (rewritten atomically) and return its one-line summary."""
    doc = json.loads(results.read_text())
    entry: dict = {"status": status, "seconds": seconds, "exit_code": exit_code}
    if part_json is not None and part_json.is_file():
        entry["result"] = json.loads(part_json.read_text())
    if status != "ok" and log is not None and log.is_file():
        entry["error"] = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-6:]
    doc["parts"][part] = entry
    doc["failed"] = sorted(k for k, v in doc["parts"].items() if v["status"] not in ("ok", "skipped"))
    write_atomic(results, doc)
    return f"[{status}] {part} ({seconds} s): {summary(entry)}"


def summary(entry: dict, width: int = 400) -> str:
    """The scalar results of a part, one level down (`key.sub=value`; rows of a list by index), or its last
    error line."""
    if entry["status"] != "ok":
        return (entry.get("error") or ["no output"])[-1][:width]
    items = []
    for key, value in _items(entry.get("result")):
        for sub, leaf in _items(value) if isinstance(value, (dict, list)) else [("", value)]:
            if isinstance(leaf, (int, float, str, bool)) or leaf is None:
                items.append(f"{key}{'.' + str(sub) if sub != '' else ''}={_short(leaf)}")
    return ", ".join(items)[:width]


def _items(value) -> list:
    if isinstance(value, dict):
        return list(value.items())
    return list(enumerate(value)) if isinstance(value, list) else []


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------ command line

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "preflight", "inputs", "exactness", "ddp", "begin", "record",
                                            "finish"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the smoke mode)")
    parser.add_argument("--site", type=Path)
    parser.add_argument("--wheels", type=Path, default=Path(".whl"))
    parser.add_argument("--data", type=Path)
    parser.add_argument("--recipe", default="vctk/sqvae_gauss4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if args.command in ("begin", "record", "finish"):
        bookkeeping(args.command, args.args)
        return
    start, failure = time.perf_counter(), None
    try:
        result = run_command(args, device)
    except PartFailed as err:
        result, failure = err.result, str(err)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    if failure:
        sys.exit(failure)


def bookkeeping(command: str, argv: list[str]) -> None:
    if command == "begin":
        begin(Path(argv[0]), argv[1], int(argv[2]))
    elif command == "finish":
        finish(Path(argv[0]), int(argv[1]))
    else:
        results, part, status, seconds, code, *rest = argv
        paths = [Path(p) for p in rest] + [None, None]
        print(record(Path(results), part, status, int(seconds), int(code), paths[0], paths[1]), flush=True)


def run_command(args, device: str) -> dict:
    if args.command == "install":
        return install(args.site, args.wheels)
    if args.command == "preflight":
        return preflight(args.cpu)
    if args.command == "inputs":
        return inputs(Path(args.args[0]), args.cpu)
    if args.command == "exactness":
        return exactness(args.data, args.recipe, args.steps, args.set, device)
    return ddp(args.data, args.recipe, args.steps, args.set, args.cpu)


if __name__ == "__main__":
    main()
