"""Crash-proof training: SIGTERM saves, SIGKILL leaves only readable checkpoints, unsafe files are refused."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from sqaudio import checkpoint


def _start(store, out, steps, *extra):
    cmd = [sys.executable, "-m", "sqaudio", "train", "demo/tiny", "--data", str(store), "--out", str(out),
           "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=1", "--set", "train.keep_last=3",
           "--quiet", "--device", "cpu", *extra]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out, proc, timeout=120):
    start = time.time()
    while not (out.exists() and checkpoint.list_checkpoints(out)):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_and_resume_finishes(tiny_store, tmp_path, signum):
    out = tmp_path / "run"
    proc = _start(tiny_store, out, 100000)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err  # a script running `train && evaluate` must not carry on
    assert "saved checkpoint" in err
    step = checkpoint.load(checkpoint.latest(out))["step"]
    assert step >= 1
    done = _start(tiny_store, out, step + 2, "--resume")
    assert done.wait(timeout=120) == 0
    assert f"from step {step}" in done.stderr.read()  # --resume says where it continues
    assert checkpoint.load(checkpoint.latest(out))["step"] == step + 2


def test_sigkill_leaves_only_readable_checkpoints(tiny_store, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "run"
    for attempt in range(2):
        proc = _start(tiny_store, out, 100000, *(["--resume"] if attempt else []))
        _wait_for_checkpoint(out, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        for path in checkpoint.list_checkpoints(out):
            assert checkpoint.load(path)["step"] == int(path.stem.split("-")[1])
    last = checkpoint.load(checkpoint.latest(out))["step"]
    proc = _start(tiny_store, out, last + 1, "--resume")
    assert proc.wait(timeout=120) == 0
    assert not list(out.glob(".checkpoint-*.tmp"))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path, cli):
    path = tmp_path / "checkpoint-1.pt"
    torch.save({"model": {}, "evil": Payload()}, path)
    with pytest.raises(Exception) as info:
        checkpoint.load(path)
    assert "weights_only" in str(info.value)
    result = cli("evaluate", path, "--data", tmp_path)
    assert result.exit_code == 2 and "safely" in result.output


def test_disk_full_is_a_clear_error_and_keeps_results(tiny_store, tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "demo/tiny", "--data", tiny_store, "--out", out, "--set", "train.checkpoint_every=2", "--quiet"]
    assert cli(*args, "--set", "train.steps=2").exit_code == 0
    before = (out / "checkpoint-2.pt").read_bytes()

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "checkpoint-4.pt"))

    monkeypatch.setattr(torch, "save", full)
    result = cli(*args, "--set", "train.steps=4", "--resume")
    assert result.exit_code == 2 and "No space left" in result.output
    assert (out / "checkpoint-2.pt").read_bytes() == before
    assert not list(out.glob(".checkpoint-*.tmp"))
