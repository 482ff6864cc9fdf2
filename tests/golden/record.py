"""Record the golden outputs that `tests/test_golden.py` checks: a feature store, a trained checkpoint and the
JSON, codes and wav that `evaluate`, `encode` and `reconstruct` (Griffin-Lim) give on them.

Run once with the sqaudio whose outputs are to be kept (python tests/golden/record.py); everything goes under
tests/golden/. Every later sqaudio must load these files and give the same outputs bit for bit.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

HERE = Path(__file__).resolve().parent
RATE = 16000
sys.path.insert(0, str(HERE.parent))
from conftest import harmonic  # noqa: E402  (the tests' generated speech)


def write_corpus(root: Path) -> None:
    """A folder corpus: two speakers, four utterances each, 16-bit PCM."""
    for s, spk in enumerate(["spkA", "spkB"]):
        for u in range(4):
            path = root / spk / f"{spk}_{u}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, harmonic(0.8 + 0.1 * u, RATE, 110 + 40 * s + 7 * u, seed=10 * s + u), RATE, subtype="PCM_16")


def sqaudio(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sqaudio", *map(str, args)], check=True,
                   env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def main() -> None:
    for name in ["corpus", "store", "run", "outputs"]:
        shutil.rmtree(HERE / name, ignore_errors=True)
    write_corpus(HERE / "corpus")
    sqaudio("prepare", HERE / "corpus", HERE / "store", "--test-fraction", "0.3")
    sqaudio("train", "demo/tiny", "--data", HERE / "store", "--out", HERE / "run", "--set", "train.steps=60",
            "--set", "train.checkpoint_every=60", "--quiet", "--device", "cpu")
    for extra in ["tensorboard", "history.jsonl", "annealing.png"]:
        target = HERE / "run" / extra
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out = HERE / "outputs"
    sqaudio("evaluate", HERE / "run", "--data", HERE / "store", "--json", out / "evaluate.json", "--device", "cpu")
    wav = HERE / "corpus" / "spkA" / "spkA_1.wav"
    sqaudio("encode", wav, "-o", out / "codes", "--model", HERE / "run", "--device", "cpu")
    sqaudio("reconstruct", wav, "-o", out / "reconstruct.wav", "--model", HERE / "run", "--device", "cpu")
    print(json.dumps(sorted(str(p.relative_to(HERE)) for p in HERE.rglob("*") if p.is_file()), indent=1))


if __name__ == "__main__":
    main()
