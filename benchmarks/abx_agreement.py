"""`sqaudio.evaluation.abx.abx_errors` against Libri-light's ABX (`zerospeech-libriabx`, the `eval_ABX` of
facebookresearch/libri-light) on the same item file and the same per-file frame features: the ABX errors within and
across speakers from both, their difference, and the wall time of each on one CPU thread.

The data are synthetic (docs/abx.md, "Agreement with Libri-light's ABX"): 10 speakers x 5 s files, phones from a
bigram model (40 phones), 50 frames per second, frame i centred at (i + 1/2) x 20 ms (Libri-light's rule), one
feature set per --sets name:
- `separated`: 16-dim float frames: the phone's mean + a shift per (speaker, phone) (s.d. 0.3) + noise (s.d. 1);
- `overlapping`: the same with shifts of s.d. 1 and noise of s.d. 2 (a high error);
- `codes`: integer codes drawn around one code per phone (as benchmarks/abx_speed.py), scored by sqaudio with its
  `codes` distance and handed to Libri-light as their 16-dim codebook vectors.
Both are given the same frames of each item (Libri-light's frame rule) and every triplet (Libri-light with no group
or speaker sampling).

    .venv/bin/python benchmarks/abx_agreement.py [--hours 0.3] [--sets separated overlapping codes]
        [--site DIR] [--wheel zerospeech_libriabx-1.0.5-...whl] [--json OUT.json]

Libri-light's ABX runs in a subprocess with PYTHONPATH=--site. When it is not importable from there, it is
installed there (`pip install --no-deps --target SITE zerospeech-libriabx==1.0.5 progressbar2 python-utils
virtual-dataset`, or --wheel instead of the registry's wheel); its DTW extension (built against numpy 1) is rebuilt
from the wheel's own dtw.pyx with Cython and the C compiler when it does not import under this numpy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqaudio.evaluation.abx as abx  # noqa: E402
from sqaudio.evaluation.items import frame_spans, read_items  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abx_speed import CODES, PHONES, RATE, SECONDS, SPEAKERS, item_lines, phone_sequence  # noqa: E402

DIM = 16
FEATURE_SIZE = 1 / RATE  # Libri-light's --feature_size (seconds per frame)
PACKAGES = ["progressbar2", "python-utils", "virtual-dataset"]
CHECK = "import libri_light_dtw; from libriabx.libri_light import eval_ABX"
NO_SAMPLING = 10**9  # max_size_group and max_x_across: every item of a group, every speaker of X

LIBRI_LIGHT = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import progressbar
import torch
torch.set_num_threads(1)


class Quiet:  # its across bar is sized with max_x = 5 before max_x_across is set: over 5, progressbar2 4.x raises
    def __init__(self, *args, **kwargs): pass
    def start(self): pass
    def update(self, value): pass
    def finish(self): pass


progressbar.ProgressBar = Quiet
from libriabx.libri_light import eval_ABX as E
features, item, feature_size, no_sampling = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
began = time.perf_counter()
scores = E.ABX(E.load_pt, item, E.find_all_files(features, ".pt"), "cosine", 1 / feature_size,
               ["within", "across"], cuda=False, max_x_across=no_sampling, max_size_group=no_sampling)
print(json.dumps({"within": 100 * scores["within"], "across": 100 * scores["across"],
                  "seconds": time.perf_counter() - began}))
"""


def _run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)


def _site_env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _importable(site: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-W", "ignore", "-c", CHECK], _site_env(site), cwd=tempfile.gettempdir())


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def ensure_libriabx(site: Path, wheel: str | None) -> str | None:
    """Make Libri-light's ABX importable with PYTHONPATH=site; None, or one line saying what is missing."""
    if _importable(site).returncode == 0:
        return None
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    done = _run(pip + [wheel or "zerospeech-libriabx==1.0.5"] + PACKAGES)
    if done.returncode != 0:
        return f"cannot install zerospeech-libriabx and {', '.join(PACKAGES)} into {site}: {_last_line(done.stderr)}"
    check = _importable(site)
    if check.returncode == 0:
        return None
    if "libri_light_dtw" not in check.stderr and "numpy" not in check.stderr:
        return f"Libri-light's ABX does not import from {site}: {_last_line(check.stderr)}"
    return _rebuild_dtw(site)


def _rebuild_dtw(site: Path) -> str | None:
    """Rebuild the wheel's DTW extension (libri_light_dtw) from its dtw.pyx against this numpy."""
    source = site / "libriabx" / "libri_light" / "ABX_src" / "dtw.pyx"
    build = site / "_build"
    done = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(build), "cython"])
    if done.returncode != 0:
        return f"the wheel's DTW extension does not import under numpy {np.__version__} and Cython cannot be " \
               f"installed to rebuild it: {_last_line(done.stderr)}"
    pyx, c_file = build / "libri_light_dtw.pyx", build / "libri_light_dtw.c"
    pyx.write_text(source.read_text())
    done = _run([sys.executable, "-m", "cython", "-3", str(pyx), "-o", str(c_file)], {**os.environ,
                                                                                       "PYTHONPATH": str(build)})
    if done.returncode != 0:
        return f"Cython cannot compile {source}: {_last_line(done.stderr)}"
    target = site / f"libri_light_dtw{sysconfig.get_config_var('EXT_SUFFIX')}"
    cc = os.environ.get("CC", "cc")
    try:
        done = _run([cc, "-shared", "-fPIC", "-O2", f"-I{np.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                     "-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION", str(c_file), "-o", str(target)])
    except FileNotFoundError:
        return f"no C compiler ({cc}) to rebuild Libri-light's DTW extension for numpy {np.__version__}"
    if done.returncode != 0:
        return f"{cc} cannot build Libri-light's DTW extension: {_last_line(done.stderr)}"
    check = _importable(site)
    return None if check.returncode == 0 else f"Libri-light's ABX does not import: {_last_line(check.stderr)}"


def synthetic_set(hours: float, kind: str, folder: Path, seed: int = 0) -> tuple[Path, list[torch.Tensor], dict]:
    """An item file in `folder`, one feature file per audio file there (features/<file>.pt, (frames, DIM) float32),
    and what sqaudio scores: the frames of each file (float (frames, DIM), or (frames,) codes for `codes`)."""
    rng = np.random.default_rng(seed)
    bigram = rng.dirichlet(np.full(PHONES, 0.3), size=PHONES) / np.arange(1, PHONES + 1)
    bigram /= bigram.sum(1, keepdims=True)
    noise, shift = {"separated": (1.0, 0.3), "overlapping": (2.0, 1.0), "codes": (0.0, 0.0)}[kind]
    means = rng.standard_normal((PHONES, DIM))
    codebook = torch.randn(CODES, DIM, generator=torch.Generator().manual_seed(seed))
    centre = rng.integers(0, CODES, PHONES)
    frames = int(SECONDS * RATE)
    centres = (np.arange(frames) + 0.5) / RATE
    (folder / "features").mkdir()
    lines, ours = ["#file onset offset #phone prev-phone next-phone speaker"], []
    for s in range(SPEAKERS):
        speaker_shift = shift * rng.standard_normal((PHONES, DIM))
        for u in range(max(1, round(hours * 3600 / SECONDS / SPEAKERS))):
            phones = phone_sequence(rng, bigram)
            ends = np.array([off for _, _, off in phones])
            label = np.array([phones[k][0] for k in np.searchsorted(ends, centres, side="right")])
            if kind == "codes":
                jitter = rng.integers(-3, 4, frames) * (rng.random(frames) < 0.5)
                codes = torch.as_tensor((centre[label] + jitter) % CODES)
                ours.append(codes)
                feats = codebook[codes]
            else:
                x = means[label] + speaker_shift[label] + noise * rng.standard_normal((frames, DIM))
                feats = torch.as_tensor(x, dtype=torch.float32)
                ours.append(feats)
            torch.save(feats.clone(), folder / "features" / f"s{s}_{u}.pt")
            lines += item_lines(f"s{s}_{u}", phones, s)
    path = folder / "synthetic.item"
    path.write_text("\n".join(lines) + "\n")
    return path, ours, {"codebook": codebook} if kind == "codes" else {}


def libri_light_spans(onset: np.ndarray, offset: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Libri-light's frame selection (ABX_src/abx_iterators.py): frames ceil(step x onset - 1/2) to
    floor(step x offset - 1/2) (exclusive) with step = 1 / feature_size, cut to the file; empty when stop <= start."""
    step = 1 / FEATURE_SIZE
    start = np.maximum(0, np.ceil(step * onset - 0.5)).astype(np.int64)
    stop = np.minimum(frames, np.floor(step * offset - 0.5)).astype(np.int64)
    return start, stop


def keep_scored_items(path: Path, frames: int) -> int:
    """Drop from the item file the items Libri-light drops (no frame by its rule), so both score the same items;
    returns how many were dropped."""
    items = read_items(path)
    start, stop = libri_light_spans(items.onset, items.offset, np.full(len(items), frames))
    keep = (start < frames) & (stop > start)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0]] + [lines[n - 1] for n in items.line[keep]]) + "\n")
    return int((~keep).sum())


def libri_light_across(keys: np.ndarray, scores: np.ndarray) -> float:
    """Libri-light's across average of sqaudio's across cells (context, A, B, speaker of a and b, speaker of x):
    the mean over (context, speaker of x) for each (speaker of a and b, A, B), then over speakers, then over (A, B)
    (ZeroSpeech's, which sqaudio follows: over contexts, then over (speaker of a and b, speaker of x) pairs)."""
    keys, scores = abx._mean_by(keys, scores, [1, 2, 3])
    _, scores = abx._mean_by(keys, scores, [0, 1])
    return float(100.0 * (1.0 - scores.mean()))


def score_sqaudio(kind: str, folder: Path, item_path: Path, extra: dict) -> dict:
    """sqaudio's errors, timed from reading the feature files, on Libri-light's frames and on its own frame rule."""
    captured = {}
    average = abx.average

    def spy(keys, scores, mode):
        captured[mode] = (keys, scores)
        return average(keys, scores, mode)

    abx.average = spy
    try:
        began = time.perf_counter()
        items = read_items(item_path)
        files = [torch.load(folder / "features" / f"{name}.pt") for name in items.files]
        if kind == "codes":
            codes = [c.to(torch.long) for c in _codes_of(files, extra["codebook"])]
            frames = abx.code_frames(codes, extra["codebook"])
        else:
            frames = abx.Frames(files)
        lengths = np.array([len(f) for f in files])
        spans = libri_light_spans(items.onset, items.offset, lengths[items.file])
        result = abx.abx_errors(frames, items, spans)
        seconds = time.perf_counter() - began
        across_ll = libri_light_across(*captured["across"])
        own = frame_spans(items, lengths, RATE, 0.5 / RATE)
        differ = float(np.mean((own[0] != spans[0]) | (own[1] != spans[1])))
        own_result = abx.abx_errors(frames, items, own)
    finally:
        abx.average = average
    return {"within": result["abx_within_pct"], "across": result["abx_across_pct"], "across_libri_light_average":
            across_ll, "seconds": seconds, "triplets_within": result["triplets_within"],
            "triplets_across": result["triplets_across"], "item_pairs": result["item_pairs"],
            "own_frame_rule": {"items_with_other_frames": differ, "within": own_result["abx_within_pct"],
                               "across": own_result["abx_across_pct"]}}


def _codes_of(files: list[torch.Tensor], codebook: torch.Tensor) -> list[torch.Tensor]:
    """The codes whose codebook vectors the feature files hold (exact: the files are rows of the codebook)."""
    return [torch.cdist(f, codebook).argmin(1) for f in files]


def score_libri_light(site: Path, folder: Path, item_path: Path) -> dict:
    done = _run([sys.executable, "-c", LIBRI_LIGHT, str(folder / "features"), str(item_path), repr(FEATURE_SIZE),
                 str(NO_SAMPLING)], _site_env(site), cwd=str(folder))
    if done.returncode != 0:
        raise SystemExit(f"Libri-light's ABX failed: {_last_line(done.stderr)}")
    return json.loads(_last_line(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=0.3)
    parser.add_argument("--sets", nargs="+", default=["separated", "overlapping", "codes"],
                        choices=["separated", "overlapping", "codes"])
    parser.add_argument("--site", type=Path, help="folder Libri-light's ABX is (or is installed) in (default: temp)")
    parser.add_argument("--wheel", help="a local zerospeech-libriabx wheel to install instead of the registry's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site or Path(tmp) / "site"
        missing = ensure_libriabx(site, args.wheel)
        if missing:
            print(f"abx_agreement: cannot run Libri-light's ABX: {missing}")
            raise SystemExit(1)
        results = {"hours": args.hours, "seed": args.seed, "sets": {}}
        for kind in args.sets:
            folder = Path(tmp) / kind
            folder.mkdir()
            item_path, _, extra = synthetic_set(args.hours, kind, folder, args.seed)
            dropped = keep_scored_items(item_path, int(SECONDS * RATE))
            ours = score_sqaudio(kind, folder, item_path, extra)
            theirs = score_libri_light(site, folder, item_path)
            row = {"items": len(read_items(item_path)), "items_dropped": dropped, "sqaudio": ours,
                   "libri_light": theirs, "diff_within_pp": ours["within"] - theirs["within"],
                   "diff_across_pp": ours["across_libri_light_average"] - theirs["across"],
                   "speed_ratio": theirs["seconds"] / ours["seconds"]}
            results["sets"][kind] = row
            print(f"{kind}: {row['items']} items; within sqaudio {ours['within']:.3f} / Libri-light "
                  f"{theirs['within']:.3f} %; across (Libri-light's average) sqaudio "
                  f"{ours['across_libri_light_average']:.3f} / Libri-light {theirs['across']:.3f} %; across "
                  f"(ZeroSpeech's average) sqaudio {ours['across']:.3f} %; time sqaudio {ours['seconds']:.1f} s, "
                  f"Libri-light {theirs['seconds']:.1f} s (x{row['speed_ratio']:.1f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
