"""The sqaudio command line: one Typer app. Heavy modules are imported inside commands (fast --help)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from sqaudio import __version__
from sqaudio.errors import UserError

console = Console(stderr=True)


class _Group(TyperGroup):
    """Turns a UserError (or an OS error such as a full disk) into one red line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as err:
            message = str(err) if isinstance(err, UserError) else _os_message(err)
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
            raise typer.Exit(2) from None


def _os_message(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where} (existing results were left as they were)"


app = typer.Typer(cls=_Group, help="Train and use SQ-VAE discrete speech codecs (Takida et al., ICML 2022).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sqaudio {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """sqaudio: prepare | train | evaluate | compare | encode | decode | reconstruct | vocoder | demo."""


def _out_json(result: dict, path: Optional[Path]) -> None:
    if path is not None:
        import json

        path.write_text(json.dumps(result, indent=2))


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped name, e.g. vctk/sqvae_gauss4 (see `sqaudio recipes`)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared features dir (speech) or image dataset root."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, config.yaml, TensorBoard, plots."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set train.steps=1000."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary."),
    devices: int = typer.Option(1, "--devices", help="Processes on this machine (DDP via torchrun); see docs/distributed.md."),
) -> None:
    """Train an SQ-VAE (or a VQ-VAE baseline) from a recipe."""
    from sqaudio.config import load_recipe
    from sqaudio.train import train as run_training

    cfg = load_recipe(recipe, overrides)
    if devices > 1:
        from sqaudio.distributed import launch

        args = ["train", recipe, "--out", str(out), "--device", device] + (["--data", str(data)] if data else [])
        args += [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else []) + (["--quiet"] if quiet else [])
        raise typer.Exit(launch(devices, args))
    if cfg.data.kind == "speech" and data is None:
        raise UserError("speech training needs --data FEATURES_DIR (the output of `sqaudio prepare`)")
    run_training(cfg, data, out, resume=resume, device=device, quiet=quiet)


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Run directory (newest checkpoint) or checkpoint file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared features dir (speech) or image dataset root."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate (speech)."),
    eval_list: Optional[Path] = typer.Option(None, "--list", help="Evaluation list JSON of (path without extension, speaker) rows, the reference format (speech)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Images: PNG with originals above reconstructions."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    audio: bool = typer.Option(False, "--audio", help="Speech: also resynthesize every utterance (codes -> decoder -> "
                               "--vocoder) and score it against the original audio: pesq_wb, stoi, estoi, si_sdr_db, "
                               "mel_distance_db2 (see docs/report.md)."),
    vocoder: str = typer.Option("griffin-lim", "--vocoder", help="With --audio: griffin-lim, a `sqaudio vocoder train` "
                                "dir, or a pretrained parallel-wavegan dir."),
) -> None:
    """Mel-MSE in dB^2 (paper Table 3) or image MSE, with perplexity, used codes and bitrate."""
    import json

    from sqaudio.evaluate import evaluate as run_evaluation, print_table

    result = run_evaluation(model, data, split, str(eval_list) if eval_list else None, device, str(grid) if grid else None)
    if audio:
        from sqaudio.audio_metrics import evaluate_audio

        result.update(evaluate_audio(model, data, split, str(eval_list) if eval_list else None, vocoder, device))
    print_table({model.name: result}, f"evaluation ({split})")
    run_dir = model if model.is_dir() else model.parent
    (run_dir / f"eval-{split}.json").write_text(json.dumps(result, indent=2))
    _out_json(result, json_path)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories (each evaluated before, or give --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluate every run on this data now."),
    split: str = typer.Option("test", "--split", help="Split whose saved results are compared."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a bar chart of the metrics here."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write all results as JSON here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
) -> None:
    """Side-by-side table of several runs, like the paper's Table 3."""
    import json

    from sqaudio.evaluate import compare_plot, evaluate as run_evaluation, print_table

    rows = {}
    for run in runs:
        saved = run / f"eval-{split}.json"
        if data is not None:
            rows[run.name] = run_evaluation(run, data, split, device=device, quiet=True)
            saved.write_text(json.dumps(rows[run.name], indent=2))
        elif saved.is_file():
            rows[run.name] = json.loads(saved.read_text())
        else:
            raise UserError(f"{run} has no {saved.name}: run `sqaudio evaluate {run} --data ...` or pass --data")
    print_table(rows, f"comparison ({split})")
    if png is not None:
        compare_plot(rows, png)
    _out_json(rows, json_path)


@app.command()
def recipes() -> None:
    """List the shipped recipes."""
    from sqaudio.config import list_recipes

    for name in list_recipes():
        typer.echo(name)


_MODEL_OPT = typer.Option(..., "--model", help="Speech SQ-VAE run directory or checkpoint.")
_VOCODER_OPT = typer.Option("griffin-lim", "--vocoder",
                            help="griffin-lim, a `sqaudio vocoder train` dir, or a pretrained parallel-wavegan dir.")


@app.command()
def reconstruct(
    inputs: list[Path] = typer.Argument(..., help="Audio files or folders (any rate, mono or stereo)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .wav (one input) or folder (several)."),
    model: Path = _MODEL_OPT,
    vocoder: str = _VOCODER_OPT,
    speaker: Optional[str] = typer.Option(None, "--speaker", help="Decode with this training speaker (voice conversion)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of input vs reconstructed mel (one input) or folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
) -> None:
    """Audio -> codes -> decoder -> vocoder -> 16 kHz wav of the input's duration."""
    from rich.progress import track
    from rich.table import Table

    from sqaudio.codec import Codec, expand_inputs, write_wav
    from sqaudio.plots import plot_mels

    files = expand_inputs(inputs)
    codec = Codec(model, vocoder, device)
    single = len(files) == 1 and output.suffix.lower() == ".wav"
    table = Table("file", "speaker", "codes used", "bitrate (bit/s)", "mel-MSE (dB^2)", "output")
    for path in track(files, description="reconstruct", console=console, disable=len(files) == 1):
        wav, stats, enc, mel_hat = codec.reconstruct(path, speaker)
        target = output if single else output / f"{path.stem}.wav"
        write_wav(target, wav, codec.features.sample_rate)
        if plot is not None:
            plot_mels(enc.mel, mel_hat[0].cpu().numpy(), plot if single else plot / f"{path.stem}.png",
                      title=path.name)
        table.add_row(path.name, stats["speaker"], f"{stats['codes_used']}/{stats['latent_frames']}",
                      f"{stats['bitrate_bps']:.0f}", f"{stats['mel_mse_db2']:.2f}", str(target))
    Console().print(table)


@app.command()
def encode(
    inputs: list[Path] = typer.Argument(..., help="Audio files or folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Codes directory."),
    model: Path = _MODEL_OPT,
    fmt: str = typer.Option("npy", "--format", help="npy (indices + JSON header) or zerospeech (one vector per line)."),
    speaker: Optional[str] = typer.Option(None, "--speaker", help="Speaker stored in the header (default: from the file)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
) -> None:
    """Audio -> discrete code indices per latent frame (50 per second)."""
    from rich.progress import track

    from sqaudio.codec import Codec, expand_inputs, write_codes

    files = expand_inputs(inputs)
    codec = Codec(model, None, device)
    for path in track(files, description="encode", console=console, disable=len(files) == 1):
        write_codes(output, path.stem, codec, codec.encode(path, speaker), fmt)
    console.print(f"wrote codes of {len(files)} file(s) to {output}")


@app.command()
def decode(
    codes: list[Path] = typer.Argument(..., help="Code files (.npy with .json header) or folders of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for the wavs."),
    model: Path = _MODEL_OPT,
    vocoder: str = _VOCODER_OPT,
    speaker: Optional[str] = typer.Option(None, "--speaker", help="Decode with this speaker instead of the header's."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
) -> None:
    """Codes -> decoder -> vocoder -> wavs."""
    from rich.progress import track

    from sqaudio.codec import Codec, expand_inputs, read_codes, write_wav

    files = expand_inputs(codes, {".npy"})
    codec = Codec(model, vocoder, device)
    for path in track(files, description="decode", console=console, disable=len(files) == 1):
        indices, header = read_codes(path)
        codec.check_header(header, path)
        wav = codec.decode(indices, speaker or header["speaker"], int(header["samples"]))
        write_wav(output / f"{path.stem}.wav", wav, codec.features.sample_rate)
    console.print(f"wrote {len(files)} wav(s) to {output}")


# --- data: put image datasets into torchvision's layout ----------------------------------------------------------

data_app = typer.Typer(help="Dataset helpers: put image data into the layout torchvision reads.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _convert_idx(src: Path, out_root: Path, folder: str) -> None:
    from rich.progress import Progress
    from rich.table import Table

    from sqaudio.images import convert_idx_gz, idx_sources

    idx_sources(src)  # name missing files before any progress is shown
    with Progress(console=console) as progress:
        task = progress.add_task(f"convert {folder}", total=4)
        rows = convert_idx_gz(src, out_root, folder, progress=lambda name: progress.advance(task))
    table = Table(title=f"{folder} written under {out_root}")
    for column in ("file", "shape", "bytes"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["file"]), " x ".join(map(str, row["shape"])), f"{row['bytes']:,}")
    console.print(table)
    console.print(f"use it with --data {out_root}")


@data_app.command("fashion-mnist")
def data_fashion_mnist(
    src: Path = typer.Argument(..., help="Folder with the four *-ubyte.gz files (Debian package "
                                         "dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)."),
    out_root: Path = typer.Argument(..., help="Data root to write FashionMNIST/raw/ into (pass it as --data)."),
) -> None:
    """Convert Fashion-MNIST idx(.gz) files into torchvision's FashionMNIST/raw/ layout."""
    _convert_idx(src, out_root, "FashionMNIST")


@data_app.command("mnist")
def data_mnist(
    src: Path = typer.Argument(..., help="Folder with the four MNIST *-ubyte.gz files."),
    out_root: Path = typer.Argument(..., help="Data root to write MNIST/raw/ into (pass it as --data)."),
) -> None:
    """Convert MNIST idx(.gz) files into torchvision's MNIST/raw/ layout."""
    _convert_idx(src, out_root, "MNIST")


@app.command()
def demo(
    out: Path = typer.Argument(Path("demo_out"), help="Output folder for the whole chain."),
    steps: int = typer.Option(1000, "--steps", help="Training steps of the tiny model."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes for prepare (default: all cores)."),
) -> None:
    """Generate speech, prepare, train a tiny SQ-VAE, evaluate it and reconstruct one file (a few minutes on CPU)."""
    from sqaudio.demo import run_demo

    run_demo(out, steps, workers, console)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to compare (speech runs, or image runs)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared features dir (speech) or image dataset root."),
    out: Path = typer.Option(..., "--out", help="Report folder: index.html, metrics.json, audio/, img/."),
    vocoder: str = typer.Option("griffin-lim", "--vocoder", help="griffin-lim, a `sqaudio vocoder train` dir, or a "
                                "pretrained parallel-wavegan dir."),
    utterances: int = typer.Option(4, "--utterances", min=1, help="Test utterances to listen to (spread over speakers)."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate and listen to (speech)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """A static listening page (no server, works offline): metrics table, players, mels, codes, curves, settings."""
    from sqaudio.report import build_report

    index = build_report(runs, data, out, vocoder, utterances, split, device, quiet)
    console.print(f"wrote the report: {index} (open it in a browser)")


def main() -> None:
    """Console-script entry point."""
    app()


# --- vocoder: train / inspect parallel-wavegan vocoders on the prepared features -------------------------------

vocoder_app = typer.Typer(help="Neural vocoders (parallel-wavegan) for the prepared features.", no_args_is_help=True)
app.add_typer(vocoder_app, name="vocoder")


@vocoder_app.command("train")
def vocoder_train(
    features_dir: Path = typer.Argument(..., help="Prepared feature store (`sqaudio prepare` output)."),
    out: Path = typer.Option(..., "--out", help="Vocoder directory (checkpoints, config.yaml, logs/)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="hifigan (default), tiny, parallel_wavegan, melgan, "
                                                               "multiband_melgan, stylemelgan, or a YAML path."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set train.steps=1000."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary table."),
    devices: int = typer.Option(1, "--devices", help="Processes on this machine (DDP via torchrun); see docs/distributed.md."),
) -> None:
    """Train a GAN vocoder (HiFi-GAN by default) on the store's normalised log-mel -> 16 kHz waveform."""
    from sqaudio.vocoder_train import train_vocoder

    if devices > 1:
        from sqaudio.distributed import launch

        args = ["vocoder", "train", str(features_dir), "--out", str(out), "--device", device]
        args += (["--recipe", recipe] if recipe else []) + [a for o in overrides for a in ("--set", o)]
        args += (["--resume"] if resume else []) + (["--quiet"] if quiet else [])
        raise typer.Exit(launch(devices, args))
    summary = train_vocoder(features_dir, out, recipe, overrides, resume, device, quiet)
    if summary["interrupted"]:  # stopped by SIGINT/SIGTERM after saving a checkpoint
        raise typer.Exit(128 + summary["interrupted"])


@vocoder_app.command("info")
def vocoder_info(
    path: str = typer.Argument(..., help="griffin-lim, a vocoder dir or checkpoint, or a parallel-wavegan dir."),
) -> None:
    """Show a vocoder's type, checkpoint and the features it takes."""
    from rich.table import Table

    from sqaudio.vocoder import load_vocoder

    vocoder = load_vocoder(path, "cpu")
    table = Table(title=f"vocoder {path}", show_header=False)
    for key, value in getattr(vocoder, "info", {}).items():
        table.add_row(key, str(value))
    for key, value in vocoder.native().describe().items():
        table.add_row(key, value)
    Console().print(table)


# --- prepare: corpus -> feature store ------------------------------------------------------------------------------

@app.command()
def prepare(
    corpus_dir: Path = typer.Argument(..., help="Corpus folder: VCTK 0.80/0.92 (holding wav48/ or wav48_silence_trimmed/), "
                                                "ZeroSpeech 2019 (holding english/), or <speaker>/ folders of audio."),
    out_dir: Path = typer.Argument(..., help="Feature store to write (manifest.jsonl, features/, feature_config.json, "
                                             "speakers.json, skipped.jsonl). Re-running resumes."),
    corpus: str = typer.Option("auto", "--corpus", help="Layout: auto (detect and say what was found), vctk, "
                                                        "zerospeech2019 or folder."),
    mic: int = typer.Option(1, "--mic", help="VCTK 0.92 microphone, 1 or 2; utterances without it are skipped and counted."),
    test_fraction: float = typer.Option(0.05, "--test-fraction", help="VCTK/folder: share of each speaker's utterances "
                                        "held out as test (hash of seed+speaker+id: stable when files are added)."),
    seed: int = typer.Option(0, "--seed", help="Salt of the held-out split hash."),
    split_files: list[Path] = typer.Option([], "--split-file", help="Reference split file (JSON rows of in_path, "
                                           "offset, duration, out_path) or evaluation list (rows of path, speaker); "
                                           "paths relative to CORPUS_DIR without extension; repeatable; replaces the "
                                           "layout's listing."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Parallel processes (default: all CPU cores)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Take the feature settings from this recipe's "
                                         "`features` section (e.g. vctk/sqvae_gauss4)."),
    overrides: list[str] = typer.Option([], "--set", help="Feature setting KEY=VALUE, repeatable, e.g. --set n_mels=40. "
                                        "Keys: sample_rate, peak, preemphasis, n_fft, win_length, hop_length, n_mels, "
                                        "fmin, fmax, top_db, pad_mode."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: prepare only part i of n (0-based) of the corpus, "
                                         "split deterministically; join the shard outputs with `sqaudio merge-stores`."),
    device: str = typer.Option("cpu", "--device", help="cpu, or e.g. cuda: features computed there in batches."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary tables."),
) -> None:
    """Compute the paper's log-mel features of a corpus (parallel, resumable) into a feature store."""
    from sqaudio.prepare import parse_feature_options, prepare as run_prepare

    features = parse_feature_options(recipe, overrides)
    try:
        run_prepare(corpus_dir, out_dir, corpus, mic, test_fraction, workers, features, split_files or None, seed,
                    quiet, console, _parse_shard(shard), device)
    except KeyboardInterrupt:
        console.print("interrupted: finished utterances are kept; run the same command again to continue")
        raise typer.Exit(130) from None


def _parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(count) > 0):
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got '{text}'")
    return int(index), int(count)


@app.command("merge-stores")
def merge_stores(
    out_dir: Path = typer.Argument(..., help="The merged feature store to write."),
    shards: list[Path] = typer.Argument(..., help="Stores written by `sqaudio prepare --shard i/n`."),
    quiet: bool = typer.Option(False, "--quiet", help="No summary table."),
) -> None:
    """Join the outputs of `prepare --shard` runs into one feature store."""
    from sqaudio.prepare import merge_stores as run_merge

    run_merge(out_dir, shards, quiet)
