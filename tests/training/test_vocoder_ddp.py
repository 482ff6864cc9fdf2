"""Vocoder training under torchrun: two gloo processes on the CPU train like one with the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import make_store

from sqaudio import checkpoint
from sqaudio.distributed import Context

pytestmark = [pytest.mark.filterwarnings("ignore:stft with return_complex=False"),  # parallel-wavegan quirks
              pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]
# HiFi-GAN has no noise input, so one and two processes see exactly the same computation. Global batch 4 over
# 3 training utterances (crosses epochs), the STFT loss on (its spectral convergence is a global-batch ratio),
# the discriminator from step 0, and an evaluation at each checkpoint (rank 0 only).
ARGS = ["train.batch_size=4", "train.checkpoint_every=1", "train.keep_last=5", "train.log_every=1",
        "train.eval_utterances=1", "train.discriminator_start=0", "loss.stft.weight=1.0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def _launch(store: Path, out: Path, steps: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "sqaudio", "vocoder", "train", str(store), "--out", str(out), "--quiet",
           "--device", "cpu", "--devices", "2", *extra,
           *[a for o in ARGS + [f"train.steps={steps}"] for a in ("--set", o)]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _assert_close(path_a: Path, path_b: Path) -> None:
    a, b = checkpoint.load(path_a), checkpoint.load(path_b)
    assert a["step"] == b["step"]
    for part in ("generator", "discriminator"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], atol=2e-5, rtol=1e-4, msg=f"{part}.{key}")


def test_two_processes_match_one_and_resume(store, tmp_path):
    from sqaudio.codec.vocoders import load_vocoder_config
    from sqaudio.data.store import open_store
    from sqaudio.training.engine import rank_seed
    from sqaudio.training.vocoder import train_vocoder

    one, two = tmp_path / "one", tmp_path / "two"
    train_vocoder(open_store(store), one, load_vocoder_config("tiny", ARGS + ["train.steps=3"]), device="cpu",
                  quiet=True)
    _launch(store, two, 2, "--recipe", "tiny")
    _assert_close(one / "checkpoint-1.pt", two / "checkpoint-1.pt")
    _assert_close(one / "checkpoint-2.pt", two / "checkpoint-2.pt")
    # only rank 0 wrote: one TensorBoard file; every rank's model RNG stream is in the checkpoint
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1
    state = checkpoint.load(two / "checkpoint-2.pt")
    assert len(state["rng_ranks"]) == 2 and torch.equal(state["rng"]["torch"], state["rng_ranks"][0]["torch"])
    rank1 = torch.Generator().manual_seed(rank_seed(1234, 1, 0)).get_state()  # HiFi-GAN draws nothing from it
    assert torch.equal(state["rng_ranks"][1]["torch"], rank1)
    # both ranks resume from checkpoint-2 and continue the single-process trajectory
    _launch(store, two, 3, "--resume")
    assert [p.name for p in checkpoint.list_checkpoints(two)] == [f"checkpoint-{s}.pt" for s in (1, 2, 3)]
    _assert_close(one / "checkpoint-3.pt", two / "checkpoint-3.pt")


def test_batch_size_must_divide_world_size_before_anything_is_written(store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "sqaudio", "vocoder", "train", str(store), "--out", str(tmp_path / "run"),
           "--recipe", "tiny", "--device", "cpu", "--devices", "2", "--set", "train.batch_size=3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("train.batch_size 3 is not divisible by 2 processes") == 1  # before any rank starts
    assert not (tmp_path / "run").exists()


def test_restore_rng_takes_each_ranks_own_stream():
    from sqaudio.training.engine import Process, rank_seed, rng_state, seed_all

    cpu = torch.device("cpu")
    with torch.random.fork_rng():
        seed_all(11)
        saved0 = rng_state(cpu)
        seed_all(22)
        saved1 = rng_state(cpu)
        state = {"rng": saved0, "rng_ranks": [saved0, saved1], "step": 7}
        Process(cpu, Context(rank=1, world=2), seed=5).restore_rng(state, 7)
        assert torch.equal(torch.get_rng_state(), saved1["torch"])
        Process(cpu, Context(rank=0, world=3), seed=5).restore_rng(state, 7)  # another world size: rank 0 keeps its
        assert torch.equal(torch.get_rng_state(), saved0["torch"])
        Process(cpu, Context(rank=2, world=3), seed=5).restore_rng(state, 7)  # ... the others start fresh ones
        assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(rank_seed(5, 2, 7)).get_state())
        assert rank_seed(5, 1, 7) != rank_seed(5, 2, 7) != rank_seed(5, 2, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spectral_convergence_rank(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from sqaudio.training.vocoder_losses import GlobalSpectralConvergence

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = x[rank::world].clone().requires_grad_(True)
        loss = GlobalSpectralConvergence()(x, y[rank::world])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": x.grad}, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another still talks to it (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()


def test_spectral_convergence_is_the_global_batch_ratio(tmp_path):
    """Each rank's loss is the full-batch ||Y - X||_F / ||Y||_F, and its input gradient is `world` times the
    full-batch one (DDP divides parameter gradients by `world`), even when the ranks' slices differ a lot."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 6, 9, generator=g), torch.rand(4, 6, 9, generator=g)
    y[1::2] *= 10  # rank 1's slice carries most of the energy: an average of per-rank ratios is far off
    mp.spawn(_spectral_convergence_rank, args=(2, _free_port(), x, y, str(tmp_path)), nprocs=2)
    full_x = x.clone().requires_grad_(True)
    full = torch.sqrt(((y - full_x) ** 2).sum() / (y ** 2).sum())
    full.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], full.detach())
        torch.testing.assert_close(got["grad"] / 2, full_x.grad[rank::2])
