"""The feature stores benchmarks/gpu_comparison.sh trains on, made here and unpacked on the GPU machine.

    .venv/bin/python benchmarks/gpu_stores.py pack [--shared ../shared/data] [--out .gpu]
    python3 benchmarks/gpu_stores.py unpack .gpu/vctk-mini.zip DIR

`pack` runs `sqaudio prepare` on ../shared/data/vctk-mini and zerospeech-mini (paper features, the default
split) and writes each store as one zip (.gpu/vctk-mini.zip, .gpu/zerospeech-mini.zip): the manifest, the feature
and speaker files, and every utterance's features as float16 .npy (half the size, deflated: the carry to a GPU
machine is small; float16 keeps 11 bits, a relative error below 5e-4, about 0.04 dB on the 80 dB scale).
`unpack` writes a store (float32 features, the format `prepare` writes) from such a zip.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ("vctk-mini", "zerospeech-mini")
META = ("manifest.jsonl", "feature_config.json", "speakers.json")


def prepare(corpus: Path, store: Path) -> None:
    subprocess.run([sys.executable, "-m", "sqaudio", "prepare", str(corpus), str(store), "--quiet"], check=True,
                   cwd=ROOT)


def pack(store: Path, archive: Path) -> None:
    """A prepared store as one zip with float16 features (atomically replaced)."""
    tmp = archive.with_name(archive.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in META:
            zf.write(store / name, name)
        for path in sorted((store / "features").rglob("*.npy")):
            buf = io.BytesIO()
            np.save(buf, np.load(path).astype(np.float16))
            zf.writestr(str(path.relative_to(store)), buf.getvalue())
    tmp.replace(archive)


def unpack(archive: Path, store: Path) -> int:
    """Write a store (float32 features) from `pack`'s zip; returns the number of feature files."""
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            target = store / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise SystemExit(f"{archive}: unsafe member {name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            data = zf.read(name)
            if name.endswith(".npy"):
                np.save(target, np.load(io.BytesIO(data)).astype(np.float32))
                count += 1
            elif name != "manifest.jsonl":
                target.write_bytes(data)
        (store / "manifest.jsonl").write_bytes(zf.read("manifest.jsonl"))  # last: a store with a manifest is whole
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["pack", "unpack"])
    parser.add_argument("paths", nargs="*", help="unpack: ARCHIVE DIR")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    args = parser.parse_args()
    if args.command == "unpack":
        archive, store = map(Path, args.paths)
        print(f"{store}: {unpack(archive, store)} feature files (float32) from {archive}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for corpus in CORPORA:
        with tempfile.TemporaryDirectory() as tmp:
            prepare(args.shared / corpus, Path(tmp) / corpus)
            pack(Path(tmp) / corpus, args.out / f"{corpus}.zip")
        print(f"{args.out / corpus}.zip: {(args.out / f'{corpus}.zip').stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
