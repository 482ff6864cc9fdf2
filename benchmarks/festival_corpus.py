"""Build a small multi-speaker, phone-aligned English corpus with Festival, in the ZeroSpeech 2019 layout, with the
ABX item file of its test part (see docs/abx.md). Needs the Debian packages festival, festvox-kallpc16k,
festvox-kdlpc16k and festvox-us-slt-hts.

    .venv/bin/python benchmarks/festival_corpus.py OUT [--speakers 9] [--test-sentences 5] [--text sentences.txt]

then, e.g.: sqaudio prepare OUT FEATS; sqaudio train ...; sqaudio evaluate RUN --abx OUT/english/test.item
--wavs OUT/english/test
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sqaudio.data.festival import SENTENCES, build_corpus, make_speakers, unavailable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="corpus folder to write (english/train/unit, english/test, .item)")
    parser.add_argument("--speakers", type=int, default=9, help="speakers: the 3 voices, then pitch/rate variants")
    parser.add_argument("--test-sentences", type=int, default=5, help="the last N sentences form the test part")
    parser.add_argument("--text", type=Path, help="one sentence per line (default: 20 Harvard sentences)")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        raise SystemExit(f"error: {reason}")
    sentences = [s.strip() for s in args.text.read_text().splitlines() if s.strip()] if args.text else list(SENTENCES)
    began = time.perf_counter()
    summary = build_corpus(args.out, make_speakers(args.speakers), sentences, args.test_sentences)
    summary["build_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
