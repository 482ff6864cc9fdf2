"""`sqaudio train` / `evaluate` / `compare` end to end on a tiny generated store."""
import json

import numpy as np
import torch

from sqaudio import checkpoint

TINY = ["--set", "train.steps=6", "--set", "train.checkpoint_every=3", "--set", "train.log_every=2", "--quiet"]


def _train(cli, store, out, *extra):
    return cli("train", "demo/tiny", "--data", store, "--out", out, "--device", "cpu", *TINY, *extra)


def _weights(run):
    return checkpoint.load(checkpoint.latest(run))["model"]


def test_resume_is_bit_exact(cli, tiny_store, tmp_path):
    straight = tmp_path / "straight"
    assert _train(cli, tiny_store, straight).exit_code == 0
    split = tmp_path / "split"
    assert _train(cli, tiny_store, split, "--set", "train.steps=3").exit_code == 0
    assert [p.name for p in checkpoint.list_checkpoints(split)] == ["checkpoint-3.pt"]
    assert _train(cli, tiny_store, split, "--resume").exit_code == 0
    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    saved = checkpoint.load(checkpoint.latest(split))
    assert saved["step"] == 6 and saved["speakers"] == ["spk0", "spk1"]
    assert saved["features"]["n_mels"] == 80
    assert (split / "config.yaml").is_file() and (split / "annealing.png").is_file()
    assert list((split / "tensorboard").iterdir())


def test_keeps_last_k_checkpoints(cli, tiny_store, tmp_path):
    out = tmp_path / "run"
    assert _train(cli, tiny_store, out, "--set", "train.checkpoint_every=1", "--set", "train.keep_last=2").exit_code == 0
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-5.pt", "checkpoint-6.pt"]


def test_bad_inputs_are_one_line_errors(cli, tiny_store, tmp_path):
    result = cli("train", "demo/tiny", "--data", tmp_path / "nothing", "--out", tmp_path / "r1", "--quiet")
    assert result.exit_code == 2 and "manifest" in result.output
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", tmp_path / "r2", "--set", "features.n_mels=40")
    assert result.exit_code == 2 and "n_mels" in result.output
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", tmp_path / "r3", "--set", "data.sample_frames=5000")
    assert result.exit_code == 2 and "frames" in result.output
    result = cli("train", "demo/tiny", "--data", tiny_store, "--out", tmp_path / "r4", "--set", "quantizer.bogus=1")
    assert result.exit_code == 2 and "quantizer.bogus" in result.output
    result = cli("train", "no/such_recipe", "--data", tiny_store, "--out", tmp_path / "r5")
    assert result.exit_code == 2 and "not found" in result.output
    assert "Traceback" not in result.output


def test_existing_run_is_not_overwritten(cli, tiny_store, tmp_path):
    out = tmp_path / "run"
    assert _train(cli, tiny_store, out, "--set", "train.steps=3").exit_code == 0
    before = (out / "checkpoint-3.pt").read_bytes()
    result = _train(cli, tiny_store, out)
    assert result.exit_code == 2 and "--resume" in result.output
    assert (out / "checkpoint-3.pt").read_bytes() == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cli, tiny_store, tmp_path):
    for path in (tiny_store / "features" / "train").rglob("*.npy"):
        mel = np.load(path)
        mel[:, :] = np.nan
        np.save(path, mel)
    out = tmp_path / "run"
    result = _train(cli, tiny_store, out)
    assert result.exit_code == 2 and "nan" in result.output.lower()
    assert not checkpoint.list_checkpoints(out)


def test_utterance_mode_trains(cli, tiny_store, tmp_path):
    out = tmp_path / "run"
    assert _train(cli, tiny_store, out, "--set", "data.mode=utterance", "--set", "data.batch_size=3").exit_code == 0
    assert checkpoint.list_checkpoints(out)


def test_evaluate_and_compare(cli, tiny_store, tmp_path):
    runs = []
    for name, extra in (("sq", []), ("vq", ["--set", "quantizer.kind=vq_ema"])):
        out = tmp_path / name
        assert _train(cli, tiny_store, out, *extra).exit_code == 0
        runs.append(out)
        result = cli("evaluate", out, "--data", tiny_store, "--json", tmp_path / f"{name}.json", "--device", "cpu")
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / f"{name}.json").read_text())
        for key in ("mel_mse_db2", "perplexity", "used_codes", "bitrate_bps", "utterances", "frames"):
            assert key in metrics
        assert metrics["utterances"] == 2 and metrics["bitrate_bps"] == 5 * 50  # log2(32) bits x 50 latents/s
        assert 1 <= metrics["perplexity"] <= metrics["used_codes"] <= 32
        assert metrics["mel_mse_db2"] > 0
    result = cli("compare", *runs, "--png", tmp_path / "cmp.png", "--json", tmp_path / "cmp.json")
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "cmp.json").read_text())) == {"sq", "vq"}
    assert (tmp_path / "cmp.png").stat().st_size > 0


def test_evaluate_mse_matches_direct_computation(tiny_store, tmp_path, cli):
    """The dB^2 metric equals the paper formula computed utterance by utterance (no batching/masking)."""
    from sqaudio.data.store import open_store
    from sqaudio.evaluation.metrics import evaluate
    from sqaudio.evaluation.runs import load_run

    out = tmp_path / "run"
    assert _train(cli, tiny_store, out).exit_code == 0
    run, store = load_run(out, "cpu"), open_store(tiny_store)
    result = evaluate(run, store, quiet=True)
    model, state = run.model, run.state
    sse, frames = 0.0, 0
    with torch.no_grad():
        for entry in store.split("test"):
            mel = torch.from_numpy(store.load(entry))
            mel = mel[:, : mel.shape[1] - mel.shape[1] % 2][None]
            spk = torch.tensor([state["speakers"].index(entry["speaker"])])
            y = model({"mel": mel, "speaker": spk}).x_hat
            target = mel[:, :, 1:-1]
            assert y.shape == target.shape
            sse += ((y - target) ** 2).sum().item()
            frames += target.shape[-1]
    assert result["frames"] == frames
    assert abs(result["mel_mse_db2"] - sse * 80**2 / (80 * frames)) < 1e-4 * result["mel_mse_db2"]


def test_train_returns_what_it_reached_and_wrote(tiny_store, tmp_path):
    from sqaudio.config import load_recipe
    from sqaudio.training.sqvae import train

    recipe = load_recipe("demo/tiny", ["train.steps=2", "train.log_every=1"])
    result = train(recipe, tiny_store, tmp_path / "run", device="cpu", quiet=True)
    assert (result.step, result.signal, result.steps_run) == (2, None, 2)
    assert result.checkpoint == tmp_path / "run" / "checkpoint-2.pt"
    assert {"loss", "tau", "lr"} <= set(result.statistics)
    assert [json.loads(line)["step"] for line in result.history.read_text().splitlines()] == [1, 2]
    assert result.config.is_file() and result.logs.is_dir()
    again = train(recipe, tiny_store, tmp_path / "run", resume=True, device="cpu", quiet=True)
    assert (again.step, again.steps_run, again.checkpoint) == (2, 0, result.checkpoint)  # nothing left to train
