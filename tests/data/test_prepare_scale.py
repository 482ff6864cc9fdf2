"""Scaling prepare out: shards that merge into the single-run store, the batched (accelerator) feature path, and
a prepare killed with SIGKILL at random points that still ends with every utterance prepared exactly once."""
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sqaudio.config import FeatureConfig
from sqaudio.data.corpora import list_corpus
from sqaudio.data.extract import run_jobs, run_jobs_on_device
from sqaudio.data.store import open_store
from sqaudio.data.synthetic import make_demo_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    make_demo_corpus(root, n_speakers=3, n_utts=8, seconds=(0.4, 1.2), seed=5)
    (root / "spk01" / "broken.wav").write_bytes(b"RIFF junk")
    return root


def _same_store(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    assert sorted(sa.entries, key=lambda e: e["id"]) == sorted(sb.entries, key=lambda e: e["id"])
    assert sa.speakers == sb.speakers and sa.features == sb.features
    for entry in sa.entries:
        assert np.array_equal(sa.load(entry), sb.load(entry))


def test_shards_merge_into_the_single_run_store(cli, corpus, tmp_path):
    assert cli("prepare", corpus, tmp_path / "whole", "--workers", "1", "--quiet").exit_code == 0
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard{i}")
        assert cli("prepare", corpus, shards[-1], "--shard", f"{i}/3", "--workers", "1", "--quiet").exit_code == 0
    sizes = [len(open_store(s).entries) for s in shards]
    assert sum(sizes) == 24 and all(n > 0 for n in sizes)  # a partition: no utterance twice, none lost
    assert cli("merge-stores", tmp_path / "merged", *shards, "--quiet").exit_code == 0
    _same_store(tmp_path / "whole", tmp_path / "merged")
    for split in ("train", "test"):  # the merged store is packed like a single run's
        whole, merged = open_store(tmp_path / "whole").packed(split), open_store(tmp_path / "merged").packed(split)
        assert merged is not None and np.array_equal(np.load(whole.path), np.load(merged.path))
    skipped = (tmp_path / "merged" / "skipped.jsonl").read_text().splitlines()
    assert len([line for line in skipped if "broken.wav" in line]) == 1


def test_bad_shard_and_device_are_one_line_errors(cli, corpus, tmp_path):
    for shard in ("3/3", "x/2", "1"):
        result = cli("prepare", corpus, tmp_path / "s", "--shard", shard)
        assert result.exit_code == 2 and "shard" in result.output
    if not torch.cuda.is_available():
        result = cli("prepare", corpus, tmp_path / "g", "--device", "cuda")
        assert result.exit_code == 2 and "not available" in result.output


@pytest.mark.parametrize("batch_seconds", [600.0, 1.5])
def test_batched_device_path_equals_the_per_file_path(corpus, tmp_path, batch_seconds):
    """The path used with --device cuda (threads read audio, features in batches bounded by their padded samples:
    all in one, or one or two per batch), run here on the CPU."""
    cfg = FeatureConfig()
    todo = list_corpus(corpus, "folder").utterances
    per_file = {r.entry["id"]: r for r in run_jobs(todo, tmp_path / "a", cfg, 1) if r.entry}
    results = list(run_jobs_on_device(todo, tmp_path / "b", cfg, 2, torch.device("cpu"), batch_seconds))
    batched = {r.entry["id"]: r for r in results if r.entry}
    assert len(results) == len(todo)  # every utterance once, a skip included
    assert per_file.keys() == batched.keys() and len(per_file) == 24
    for key, result in per_file.items():
        assert result == batched[key]
        a = np.load(tmp_path / "a" / result.entry["features"])
        b = np.load(tmp_path / "b" / result.entry["features"])
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sigkill_at_random_points_then_every_utterance_once(corpus, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "sqaudio", "prepare", str(corpus), str(out), "--workers", "1", "--quiet"]
    rng = random.Random(1)
    interrupted = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (out / ".prepare-journal.jsonl").exists() and proc.poll() is None:
            time.sleep(0.005)  # the journal appears when feature extraction starts
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += not (out / "manifest.jsonl").exists()
    assert interrupted >= 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    store = open_store(out)
    ids = [e["id"] for e in store.entries]
    assert len(ids) == len(set(ids)) == 24
    on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "features").rglob("*") if p.is_file())
    assert on_disk == sorted(e["features"] for e in store.entries)  # no temporaries, no orphans
    for entry in store.entries:
        assert store.load(entry).shape == (80, entry["frames"])
    _reference = tmp_path / "clean"
    assert subprocess.run(cmd[:5] + [str(_reference)] + cmd[6:], capture_output=True).returncode == 0
    _same_store(out, _reference)
