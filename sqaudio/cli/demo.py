"""`sqaudio demo`, the README's main job on a small built-in default: generated speech -> prepare -> train ->
evaluate -> audio -> a listening report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from sqaudio import checkpoint
from sqaudio.cli.app import app, console
from sqaudio.config import load_recipe


def run_demo(out: Path, steps: int = 1000, workers: int | None = None) -> dict:
    """Run the whole chain into `out`, ending with a listening report (out/report/index.html); returns the evaluation
    metrics. Re-running reuses what is done."""
    from sqaudio.codec.codec import Codec
    from sqaudio.codec.vocoders import load_vocoder
    from sqaudio.codec.waveform import write_wav
    from sqaudio.data.prepare import PrepareOptions, prepare
    from sqaudio.data.store import open_store
    from sqaudio.data.synthetic import make_demo_corpus
    from sqaudio.distributed import pick_device
    from sqaudio.evaluation.metrics import evaluate, print_table
    from sqaudio.evaluation.report import build_report
    from sqaudio.evaluation.runs import load_run, save_result
    from sqaudio.plots import plot_mels
    from sqaudio.training.sqvae import train

    out.mkdir(parents=True, exist_ok=True)
    corpus, features, run = out / "corpus", out / "features", out / "run"
    console.rule("1/5 generate a small multi-speaker corpus (source-filter vowel sequences)")
    if not corpus.exists():
        make_demo_corpus(corpus, n_speakers=4, n_utts=12)
    console.rule("2/5 sqaudio prepare")
    prepare(corpus, features, options=PrepareOptions(layout="folder", workers=workers), console=console)
    console.rule("3/5 sqaudio train demo/tiny")
    recipe = load_recipe("demo/tiny", [f"train.steps={steps}"])
    done = run.is_dir() and checkpoint.list_checkpoints(run)
    if not done or checkpoint.load(checkpoint.latest(run))["step"] < steps:
        train(recipe, features, run, resume=bool(done))
    console.rule("4/5 sqaudio evaluate and reconstruct (Griffin-Lim)")
    device = pick_device(None)
    loaded, store = load_run(run, device), open_store(features)  # each read once for the steps below
    metrics = evaluate(loaded, store)
    save_result(run, metrics)
    print_table({"demo": metrics}, "demo evaluation (test split)")
    test = store.split("test")[0]
    vocoder = load_vocoder("griffin-lim", device, store.features)
    codec = Codec(loaded.model, loaded.state, vocoder)
    rec = codec.reconstruct(Path(test["source"]))
    write_wav(out / "reconstructed.wav", rec.wav, codec.features.sample_rate)
    plot_mels(rec.encoded.mel, rec.mel_hat[0].cpu().numpy(), out / "reconstructed.png",
              title=Path(test["source"]).name)
    console.rule("5/5 sqaudio report (listening page)")
    index = build_report([loaded], out / "report", store, vocoder, utterances=4)
    table = Table("output", "where", title="demo outputs")
    for name, path in [("corpus (16 kHz wavs)", corpus), ("features + manifest", features),
                       ("run: checkpoints, config.yaml, TensorBoard", run), ("self-annealing curves", run / "annealing.png"),
                       ("metrics", run / "eval-test.json"), ("input", test["source"]),
                       ("reconstruction", out / "reconstructed.wav"), ("mel plot", out / "reconstructed.png"),
                       ("listening report (open in a browser)", index)]:
        table.add_row(name, str(path))
    Console().print(table)
    console.print(f"listening report: {index.absolute()}")
    return metrics


@app.command()
def demo(
    out: Path = typer.Argument(Path("demo_out"), help="Output folder for the whole chain."),
    steps: int = typer.Option(1000, "--steps", help="Training steps of the tiny model."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes for prepare (default: all cores)."),
) -> None:
    """Generate speech, prepare, train a tiny SQ-VAE, evaluate it and reconstruct one file (a few minutes on CPU)."""
    run_demo(out, steps, workers)
