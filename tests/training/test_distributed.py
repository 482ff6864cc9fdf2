"""Two gloo processes on the CPU train exactly like one process with the same global batch, and fail cleanly
(more failures, each one line printed once: tests/cli/test_launch_errors.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_store

from sqaudio import checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
ARGS = ["--set", "train.checkpoint_every=2", "--quiet", "--device", "cpu"]
VQ = ["quantizer.kind=vq_ema", "model.speech.jitter=0.0"]  # the only randomness is the data order
SQ = ["quantizer.kind=gaussian", "model.speech.jitter=0.5"]  # Gumbel and jitter noise keyed by global position


def _run(store, out, nproc, steps, overrides, *extra, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sqaudio", "train", "demo/tiny", "--data", str(store), "--out", str(out),
           "--set", f"train.steps={steps}", *ARGS, *[a for o in overrides for a in ("--set", o)], *extra]
    if nproc > 1:
        cmd += ["--devices", str(nproc)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def _assert_same(run_a, run_b, overrides):
    """Same trajectory: per tensor, the runs differ by a tiny fraction of what training moved it.

    (Adam turns rounding-level gradient differences on near-zero gradients into lr-sized steps, so a
    per-element tolerance would be either loose or flaky; a wrong data split, noise draw or gradient
    average moves every tensor by a large fraction of its update.)
    """
    from sqaudio.config import load_recipe
    from sqaudio.models.sqvae import build_model

    a = checkpoint.load(checkpoint.latest(run_a))["model"]
    b = checkpoint.load(checkpoint.latest(run_b))["model"]
    recipe = load_recipe("demo/tiny", ["model.speech.n_speakers=2", *overrides])
    torch.manual_seed(recipe.train.seed)
    start = build_model(recipe).state_dict()
    for key, value in a.items():
        if not value.is_floating_point():
            continue
        moved = (value.double() - start[key].double()).norm()
        diff = (value.double() - b[key].double()).norm()
        assert diff <= 1e-2 * moved + 1e-6, (key, float(diff), float(moved))


def test_two_processes_match_one_and_resume(tiny_store, tmp_path):
    _run(tiny_store, tmp_path / "one", 1, 4, VQ)
    _run(tiny_store, tmp_path / "two", 2, 4, VQ)
    _assert_same(tmp_path / "one", tmp_path / "two", VQ)
    _run(tiny_store, tmp_path / "two_resumed", 2, 2, VQ)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "two_resumed")] == ["checkpoint-2.pt"]
    _run(tiny_store, tmp_path / "two_resumed", 2, 4, VQ, "--resume")
    _assert_same(tmp_path / "two", tmp_path / "two_resumed", VQ)


def test_noisy_sq_two_processes_match_one(tiny_store, tmp_path):
    """Gumbel and jitter noise differ between the ranks' rows and still equal the one-process draw."""
    _run(tiny_store, tmp_path / "one", 1, 4, SQ, "--set", "train.log_every=1")
    _run(tiny_store, tmp_path / "two", 2, 4, SQ, "--set", "train.log_every=1")
    _assert_same(tmp_path / "one", tmp_path / "two", SQ)
    first = [json.loads((tmp_path / run / "history.jsonl").read_text().splitlines()[0]) for run in ("one", "two")]
    assert first[1]["perplexity"] == pytest.approx(first[0]["perplexity"], rel=1e-3)  # code usage of the global batch
    state = checkpoint.load(checkpoint.latest(tmp_path / "two"))
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"],
                                                            state["rng_ranks"][1]["torch"])


def test_utterance_mode_with_a_bucket_smaller_than_the_world(tmp_path):
    """5 utterances, batch 4: the last bucket (1 utterance) is smaller than 2 ranks; it joins its neighbour
    (whatever the world size), the 5 split 3 + 2, and each rank's loss is weighted by its share."""
    store = make_store(tmp_path / "store", n_speakers=1, n_utts=6)
    over = [*SQ, "data.mode=utterance", "data.batch_size=4", "model.speech.n_speakers=2"]
    _run(store, tmp_path / "one", 1, 4, over)
    _run(store, tmp_path / "two", 2, 4, over)
    _assert_same(tmp_path / "one", tmp_path / "two", over)


def test_bad_data_under_devices_is_reported_once(tmp_path):
    done = _run(tmp_path / "nothing", tmp_path / "run", 2, 4, [], ok=False)
    assert done.returncode == 2
    assert len([line for line in done.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "Traceback" not in done.stderr


def test_relaunch_arguments_are_the_commands_own_without_devices():
    import typer
    from typer.testing import CliRunner

    from sqaudio.distributed import command_args

    app, group, seen = typer.Typer(), typer.Typer(), []
    app.add_typer(group, name="vocoder")
    app.command("other")(lambda: None)

    @group.command("train")
    def train(command: typer.Context, store: str = typer.Argument(...), out: str = typer.Option(..., "--out"),
              recipe: str | None = typer.Option(None, "--recipe"), sets: list[str] = typer.Option([], "--set"),
              resume: bool = typer.Option(False, "--resume"), devices: int = typer.Option(1, "--devices")):
        seen.append(command_args(command, "--devices"))

    args = ["vocoder", "train", "--devices", "2", "feats", "--set", "a.b=1", "--out", "run", "--set", "c=x y"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen == [["vocoder", "train", "feats", "--out", "run", "--set", "a.b=1", "--set", "c=x y"]]
    assert CliRunner().invoke(app, [*args, "--resume", "--recipe", "tiny"]).exit_code == 0
    assert seen[1] == [*seen[0][:5], "--recipe", "tiny", *seen[0][5:], "--resume"]
