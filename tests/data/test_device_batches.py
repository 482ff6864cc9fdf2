"""`prepare --device ...`: feature batches bounded by their padded samples, a batch that runs out of device memory
computed in halves, a read-ahead bounded in bytes, and the --batch-seconds option."""
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sqaudio.data.extract import read_ahead, sample_batches, split_on_oom
from sqaudio.data.synthetic import make_demo_corpus
from sqaudio.errors import UserError

CPU = torch.device("cpu")


def test_sample_batches_respect_the_bound_and_keep_every_utterance_once_longest_first():
    rng = random.Random(0)
    bound = 600_000
    lengths = sorted([rng.randint(2_000, 250_000) for _ in range(400)] + [900_000, 700_000], reverse=True)
    batches = list(sample_batches(range(len(lengths)), lengths.__getitem__, bound))
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))  # each once, in order
    assert batches[0] == [0] and batches[1] == [1]  # longer than the bound: alone
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= bound or len(batch) == 1
        assert lengths[batch[0]] == max(lengths[i] for i in batch)  # padded to its first, the longest
    for batch, following in zip(batches, batches[1:]):  # full: the next utterance would not have fitted
        assert (len(batch) + 1) * max(lengths[i] for i in batch + following[:1]) > bound
    assert len(batches) < len(lengths) / 3  # short utterances share batches


def test_sample_batches_bound_unsorted_input_too():
    lengths = [10, 90, 10, 10, 50, 50, 50]
    batches = list(sample_batches(lengths, int, 100))
    assert batches == [[10], [90], [10, 10], [50, 50], [50]]
    assert all(len(b) * max(b) <= 100 for b in batches)


def test_a_batch_out_of_device_memory_is_computed_in_halves_with_the_same_results():
    attempts = []

    def square(batch: list[int]) -> list[int]:  # runs out of memory above 3 items, like a device would
        attempts.append(len(batch))
        if len(batch) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * x for x in batch]

    items = list(range(13))
    assert split_on_oom(square, items, str, CPU) == square(items[:3]) + [x * x for x in items[3:]]
    assert attempts[0] == 13 and max(attempts[1:]) <= 7 and sum(n for n in attempts if n <= 3) == 13 + 3
    attempts.clear()
    assert split_on_oom(square, items[:3], str, CPU) == [0, 1, 4] and attempts == [3]  # no split when it fits


def test_one_utterance_that_never_fits_is_a_one_line_error_naming_it():
    def never(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(UserError, match=r"out of memory on cpu computing the features of long\.flac: .*--device cpu"):
        split_on_oom(never, ["short.flac", "long.flac"][1:], str, CPU)


def test_other_errors_are_not_retried():
    def broken(batch):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        split_on_oom(broken, [1, 2, 3, 4], str, CPU)


class Counting(ThreadPoolExecutor):
    def __init__(self, workers: int):
        super().__init__(workers)
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        return super().submit(fn, *args)


def test_the_read_ahead_holds_a_bounded_number_of_bytes_in_order():
    with Counting(3) as pool:
        results = read_ahead(pool, list(range(60)), lambda i: np.full(25, i, dtype=np.float32), 3,
                             size=lambda r: r.nbytes, max_bytes=1000)  # 100 bytes each: 10 waiting at most
        for taken, result in enumerate(results, 1):
            assert result[0] == taken - 1
            assert pool.submitted - taken <= 10 + 3 - 1  # under max_bytes finished + `limit` in flight
        assert pool.submitted == 60


def test_the_read_ahead_runs_at_most_limit_reads_at_once():
    running, most, lock = [0], [0], threading.Lock()

    def read(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return i

    with ThreadPoolExecutor(8) as pool:
        assert list(read_ahead(pool, list(range(40)), read, 3)) == list(range(40))
    assert 1 <= most[0] <= 3


def test_the_read_ahead_raises_a_failed_read_in_its_place():
    def read(i):
        if i == 4:
            raise OSError("disk gone")
        return i

    with ThreadPoolExecutor(2) as pool:
        results = read_ahead(pool, list(range(10)), read, 3)
        assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
        with pytest.raises(OSError, match="disk gone"):
            next(results)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_batch_seconds_must_be_a_positive_number(cli, tmp_path, value):
    result = cli("prepare", tmp_path / "corpus", tmp_path / "out", "--batch-seconds", value)
    assert result.exit_code == 2
    assert "--batch-seconds" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_batch_seconds_is_accepted(cli, tmp_path):
    make_demo_corpus(tmp_path / "corpus", n_speakers=2, n_utts=2, seconds=(0.4, 0.6), seed=1)
    result = cli("prepare", tmp_path / "corpus", tmp_path / "out", "--batch-seconds", "2.5", "--workers", "1",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "manifest.jsonl").is_file() and (tmp_path / "out" / "packed" / "train.npy").is_file()
