"""The packed training data path: one memory-mapped array per split gives exactly the batches of the file-by-file
path, is rebuilt when the manifest changes, is built on first use for stores made without it, and falls back to
file-by-file reads (one note) where the store cannot be written."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sqaudio.config import DataConfig
from sqaudio.data.batches import SpeechItems, eval_speech_batches, speech_batches
from sqaudio.data.store import PACKED, entries_fingerprint, open_store, remove_orphans, write_store
from sqaudio.errors import UserError

GOLDEN_STORE = Path(__file__).resolve().parents[1] / "golden" / "store"
CROPS = DataConfig(batch_size=4, sample_frames=16)
UTTERANCES = DataConfig(mode="utterance", batch_size=3, max_frames=60)


def assert_same_batches(a, b, steps=range(12)) -> None:
    for step in steps:
        x, y = a[step], b[step]
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (step, key)


@pytest.mark.parametrize("cfg", [CROPS, UTTERANCES], ids=["crop", "utterance"])
def test_packed_batches_equal_the_file_by_file_batches(tiny_store, cfg):
    store = open_store(tiny_store)
    per_file = speech_batches(store, cfg, store.speakers, seed=3, packed=False)
    assert not (tiny_store / PACKED).exists()
    packed = speech_batches(store, cfg, store.speakers, seed=3)
    assert (tiny_store / PACKED / "train.npy").is_file() and (tiny_store / PACKED / "train.json").is_file()
    assert_same_batches(per_file, packed)
    assert packed[0]["mel"].abs().sum() > 0


def test_the_pack_holds_every_utterance_frame_major(tiny_store):
    store = open_store(tiny_store)
    pack = store.packed("train", build=True)
    array = np.load(pack.path)
    index = json.loads((tiny_store / PACKED / "train.json").read_text())
    assert index["fingerprint"] == entries_fingerprint(store.split("train"))
    assert array.dtype == np.float32 and array.shape == (sum(index["frames"]), store.features.n_mels)
    for entry in store.split("train"):
        first = pack.rows[entry["id"]]
        np.testing.assert_array_equal(array[first:first + entry["frames"]].T, store.load(entry))


def test_a_store_made_before_packs_gets_one_on_first_use(tmp_path):
    shutil.copytree(GOLDEN_STORE, tmp_path / "store")
    store = open_store(tmp_path / "store")
    assert store.packed("train") is None  # recorded without packs; reading alone builds nothing
    packed = speech_batches(store, CROPS, store.speakers, seed=0)
    assert store.packed("train") is not None
    assert_same_batches(speech_batches(store, CROPS, store.speakers, seed=0, packed=False), packed)


def test_a_stale_pack_is_rebuilt_from_the_manifest(tiny_store):
    store = open_store(tiny_store)
    speech_batches(store, CROPS, store.speakers, seed=0)
    before = (tiny_store / PACKED / "train.npy").stat().st_size
    dropped = store.split("train")[0]
    lines = [e for e in store.entries if e["id"] != dropped["id"]]
    (tiny_store / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    changed = open_store(tiny_store)
    assert changed.packed("train") is None  # the index's fingerprint no longer matches
    packed = speech_batches(changed, CROPS, changed.speakers, seed=0)
    assert dropped["id"] not in changed.packed("train").rows
    assert (tiny_store / PACKED / "train.npy").stat().st_size < before
    assert_same_batches(speech_batches(changed, CROPS, changed.speakers, seed=0, packed=False), packed)


def test_an_unwritable_store_reads_file_by_file_with_one_note(tiny_store, capsys):
    (tiny_store / PACKED).write_text("in the way")  # any OSError on writing: read-only disk, full disk, ...
    store = open_store(tiny_store)
    batches = speech_batches(store, CROPS, store.speakers, seed=0)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "file by file" in err and "Traceback" not in err
    assert_same_batches(speech_batches(store, CROPS, store.speakers, seed=0, packed=False), batches, range(3))


def test_a_pack_gone_after_the_start_is_a_one_line_error(tiny_store):
    store = open_store(tiny_store)
    batches = speech_batches(store, CROPS, store.speakers, seed=0)
    (tiny_store / PACKED / "train.npy").write_bytes(b"\x93NUMPY truncated")  # e.g. replaced while training
    with pytest.raises(UserError, match=r"cannot read features .*train\.npy.*re-run prepare"):
        batches[0]


def test_a_missing_feature_file_is_a_one_line_error(tiny_store):
    store = open_store(tiny_store)
    batches = speech_batches(store, CROPS, store.speakers, seed=0, packed=False)
    for entry in store.split("train"):
        (tiny_store / entry["features"]).unlink()
    with pytest.raises(UserError, match=r"cannot read features .*\.npy \(entry .*re-run prepare"):
        batches[0]
    with pytest.raises(UserError, match="cannot read features"):  # building the pack reads them too
        speech_batches(store, CROPS, store.speakers, seed=0)


def test_items_open_their_map_once_per_process_and_pickle_without_it(tiny_store):
    store = open_store(tiny_store)
    train = store.split("train")
    items = SpeechItems(store, train, store.speakers, {"train": store.packed("train", build=True)})
    first = items.batch([(0, 0, 10), (1, 5, 12)], with_lengths=True)
    assert items._arrays  # opened on the first read
    copy = pickle.loads(pickle.dumps(items))  # what a spawned DataLoader worker receives
    assert not copy._arrays and len(pickle.dumps(items)) < 20_000
    again = copy.batch([(0, 0, 10), (1, 5, 12)], with_lengths=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["lengths"].tolist() == [10, 12] and first["mel"][0, :, 10:].abs().sum() == 0  # zero padding


def test_evaluation_batches_read_the_packs_alike(tiny_store):
    store = open_store(tiny_store)
    entries = store.entries
    per_file = list(eval_speech_batches(store, entries, store.speakers, batch_size=3))
    write_store(tiny_store, store.entries, [], store.features)  # what prepare ends with: every split packed
    store = open_store(tiny_store)
    assert store.packed("test") is not None and store.packed("train") is not None
    packed = list(eval_speech_batches(store, entries, store.speakers, batch_size=3))
    assert len(per_file) == len(packed)
    for (rows_a, a), (rows_b, b) in zip(per_file, packed):
        assert rows_a == rows_b and all(torch.equal(a[k], b[k]) for k in a)


def test_remove_orphans_keeps_the_packs_and_drops_their_temporaries(tiny_store):
    store = write_store(tiny_store, open_store(tiny_store).entries, [], open_store(tiny_store).features)
    stale = tiny_store / PACKED / ".train.npy.abc123.tmp"
    stale.write_bytes(b"killed while packing")
    assert remove_orphans(store) == 1 and not stale.exists()
    assert store.packed("train") is not None and store.packed("test") is not None


def test_a_split_that_empties_loses_its_pack(tiny_store):
    store = write_store(tiny_store, open_store(tiny_store).entries, [], open_store(tiny_store).features)
    assert (tiny_store / PACKED / "test.npy").is_file()
    train_only = [e for e in store.entries if e["split"] == "train"]
    write_store(tiny_store, train_only, [], store.features)
    assert not (tiny_store / PACKED / "test.npy").exists() and not (tiny_store / PACKED / "test.json").exists()
    assert open_store(tiny_store).packed("train") is not None


def test_the_data_path_benchmark_runs_and_compares_equal_batches():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "data_path.py"
    spec = importlib.util.spec_from_file_location("data_path", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure("vctk/sqvae_gauss4", "crop", batches=2, rounds=1, utterances=20)
    assert result["utterances"] == 20 and result["batch_size"] == 52
    assert result["per_file_ms"] > 0 and result["packed_ms"] > 0 and result["speedup"] > 0
