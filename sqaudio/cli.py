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
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)  # one line
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


def _out_json(result: dict, path: Path) -> Path:
    import json

    from sqaudio.checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return path


_OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace outputs that exist already (default: refuse).")


def _say_wrote(what: str, path: Path) -> None:
    """Summary line on stdout: where an output went."""
    Console().print(f"wrote {what}: {escape(str(path))}", highlight=False, soft_wrap=True)


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
    """Train an SQ-VAE (or a VQ-VAE baseline) from a recipe. Ctrl-C/SIGTERM saves and exits 128 + signal."""
    from sqaudio.config import load_recipe, validate_recipe
    from sqaudio.train import train as run_training

    cfg = load_recipe(recipe, overrides)
    validate_recipe(cfg)
    if cfg.data.kind == "speech" and data is None:
        raise UserError("speech training needs --data FEATURES_DIR (the output of `sqaudio prepare`)")
    if devices > 1:
        from sqaudio.distributed import launch

        if cfg.data.kind == "speech":
            from sqaudio.store import open_store

            open_store(data)  # a bad --data is reported once, here, before any process starts
        args = ["train", recipe, "--out", str(out), "--device", device] + (["--data", str(data)] if data else [])
        args += [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else []) + (["--quiet"] if quiet else [])
        raise typer.Exit(launch(devices, args))
    result = run_training(cfg, data, out, resume=resume, device=device, quiet=quiet, overrides=overrides)
    if result["interrupted"]:
        raise typer.Exit(128 + result["interrupted"])


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
    overwrite: bool = _OVERWRITE_OPT,
) -> None:
    """Mel-MSE in dB^2 (paper Table 3) or image MSE, with perplexity, used codes and bitrate.

    The result is also kept in the run directory as eval-<split>.json, or eval-list-<list name>.json with --list
    (what compare reads)."""
    from sqaudio.evaluate import evaluate as run_evaluation, print_table, result_path, save_result
    from sqaudio.outputs import check_free

    check_free([p for p in (json_path, grid) if p is not None], overwrite)
    result_path(model if model.is_dir() else model.parent, split, eval_list)  # refuse a clash before evaluating
    audio_result = {}
    if audio:
        from sqaudio.audio_metrics import evaluate_audio

        audio_result = evaluate_audio(model, data, split, str(eval_list) if eval_list else None, vocoder, device)
    result = run_evaluation(model, data, split, str(eval_list) if eval_list else None, device, str(grid) if grid else None)
    result.update(audio_result)
    print_table({model.name: result}, f"evaluation ({f'list {eval_list.name}' if eval_list else split})")
    run_dir = model if model.is_dir() else model.parent
    _say_wrote("result (kept with the run)", save_result(run_dir, result))
    if json_path is not None:
        _say_wrote("JSON", _out_json(result, json_path))
    if grid is not None:
        _say_wrote("image grid", grid)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories (each evaluated before, or give --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluate every run on this data now."),
    split: str = typer.Option("test", "--split", help="Split whose saved results are compared."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a bar chart of the metrics here."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write all results as JSON here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    overwrite: bool = _OVERWRITE_OPT,
) -> None:
    """Side-by-side table of several runs, like the paper's Table 3. Columns are named by the shortest
    distinct end of each run's path (runs/a/x and runs/b/x -> a/x, b/x)."""
    import json

    from sqaudio.evaluate import evaluate as run_evaluation, print_table, result_path, run_names, save_result
    from sqaudio.plots import compare_plot
    from sqaudio.outputs import check_free

    names = run_names(runs)
    check_free([p for p in (png, json_path) if p is not None], overwrite)
    rows = {}
    for name, run in zip(names, runs):
        saved = result_path(run, split)
        if data is not None:
            rows[name] = run_evaluation(run, data, split, device=device, quiet=True)
            save_result(run, rows[name])
        elif saved.is_file():
            rows[name] = json.loads(saved.read_text())
        else:
            raise UserError(f"{run} has no {saved.name}: run `sqaudio evaluate {run} --data ...` or pass --data")
        rows[name]["run"] = str(run)
    print_table(rows, f"comparison ({split})")
    if png is not None:
        _say_wrote("chart", compare_plot(rows, png))
    if json_path is not None:
        _say_wrote("JSON", _out_json(rows, json_path))


@app.command()
def recipes() -> None:
    """List the shipped recipes (SQ-VAE recipes for `train`, then vocoder recipes for `vocoder train`)."""
    from sqaudio.config import list_recipes
    from sqaudio.vocoder import list_vocoder_recipes

    for name in list_recipes():
        typer.echo(name)
    typer.echo("# vocoder recipes (sqaudio vocoder train FEATURES --recipe NAME):")
    for name in list_vocoder_recipes():
        typer.echo(f"vocoder/{name}")


_MODEL_OPT = typer.Option(..., "--model", help="Speech SQ-VAE run directory or checkpoint.")
_VOCODER_OPT = typer.Option("griffin-lim", "--vocoder",
                            help="griffin-lim, a `sqaudio vocoder train` dir, or a pretrained parallel-wavegan dir.")


_SPEAKER_HELP = ("Training speaker to decode with (voice conversion). Default: the training speaker named by the "
                 "file name's prefix (p225_001.wav) or its folder, else the first training speaker, with a note.")


def _note_inputs(inputs) -> None:
    """Note on stderr: files left out of input folders."""
    if inputs.note():
        console.print(f"note: {inputs.note()}", highlight=False, soft_wrap=True)


def _note_speakers(codec, fallbacks: list[Path]) -> None:
    """One note on stderr for the inputs decoded with the first training speaker because none was named."""
    if fallbacks:
        known = ", ".join(codec.speakers[:8]) + (", ..." if len(codec.speakers) > 8 else "")
        which = escape(str(fallbacks[0])) + (f" and {len(fallbacks) - 1} more" if len(fallbacks) > 1 else "")
        console.print(f"note: {which}: no training speaker in the file or folder name; using speaker "
                      f"{codec.speakers[0]}, the first training speaker (choose with --speaker: {known})",
                      highlight=False, soft_wrap=True)


def _audio_samples(codec, path: Path) -> int:
    """The input's length at the model's rate from its header (0 when unreadable: the codec says why)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:  # the codec reports unreadable files with their reason
        return 0
    return info.frames * codec.features.sample_rate // info.samplerate


def _long_progress(codec, samples: int, label: str, encode: bool = True):
    """A progress bar over the model windows of one long input ((None, None) for inputs of a few windows)."""
    from rich.progress import Progress

    total = codec.windows(samples, encode)
    if total <= 3:
        return None, None
    progress = Progress(console=console, transient=True)
    task = progress.add_task(label, total=total)
    return progress, lambda: progress.advance(task)


@app.command()
def reconstruct(
    inputs: list[Path] = typer.Argument(..., help="Audio files or folders (any rate, mono or stereo; "
                                                  ".wav .flac .ogg .opus .mp3 .aiff .au .caf)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .wav (one input) or folder (several; the "
                                                            "inputs' relative folders are kept)."),
    model: Path = _MODEL_OPT,
    vocoder: str = _VOCODER_OPT,
    speaker: Optional[str] = typer.Option(None, "--speaker", help=_SPEAKER_HELP),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of input vs reconstructed mel (one input) or folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    overwrite: bool = _OVERWRITE_OPT,
) -> None:
    """Audio -> codes -> decoder -> vocoder -> 16 kHz wav of the input's duration (long files in bounded memory)."""
    from rich.table import Table

    from sqaudio.codec import Codec
    from sqaudio.outputs import check_free, find_inputs, targets

    found = find_inputs(inputs)
    wavs = targets(found, output, ".wav")
    plots = targets(found, plot, ".png", "--plot") if plot is not None else []
    check_free(wavs + plots, overwrite)
    _note_inputs(found)
    codec = Codec(model, vocoder, device)
    table = Table("file", "speaker", "codes used", "bitrate (bit/s)", "mel-MSE (dB^2)", "output", title="reconstructed")
    fallbacks = []
    for i, path in enumerate(found.files):
        row = _reconstruct_one(codec, path, speaker, wavs[i], plots[i] if plots else None, f"{i + 1}/{len(wavs)}")
        table.add_row(str(found.relative[i]), *row[1:])
        fallbacks += [path] if row[0] == "fallback" else []
    _note_speakers(codec, fallbacks)
    Console().print(table)
    if plot is not None:
        _say_wrote(f"{len(plots)} mel plot(s)", plot)


def _reconstruct_one(codec, path: Path, speaker: Optional[str], target: Path, plot: Optional[Path], label: str):
    from contextlib import nullcontext

    from sqaudio.plots import plot_mels

    console.print(f"reconstruct {label}: {escape(str(path))}", highlight=False)
    progress, step = _long_progress(codec, _audio_samples(codec, path), path.name)
    with progress or nullcontext():  # flat memory: the wav is written block by block (the mels only for --plot)
        stats, enc, mel_hat = codec.reconstruct_to(path, target, speaker, step, keep_mels=plot is not None)
    if plot is not None:
        plot_mels(enc.mel, mel_hat[0].cpu().numpy(), plot, title=path.name, top_db=codec.features.top_db,
                  frame_rate=codec.features.frame_rate)
    return (enc.speaker_from, stats["speaker"], f"{stats['codes_used']}/{stats['latent_frames']}",
            f"{stats['bitrate_bps']:.0f}", f"{stats['mel_mse_db2']:.2f}", str(target))


@app.command()
def encode(
    inputs: list[Path] = typer.Argument(..., help="Audio files or folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Codes folder (the inputs' relative folders are kept)."),
    model: Path = _MODEL_OPT,
    fmt: str = typer.Option("npy", "--format", help="npy (indices + JSON header) or zerospeech (one vector per line)."),
    speaker: Optional[str] = typer.Option(None, "--speaker",
                                          help="Speaker stored in the header. " + _SPEAKER_HELP.split(". ", 1)[1]),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    overwrite: bool = _OVERWRITE_OPT,
) -> None:
    """Audio -> discrete code indices per latent frame (50 per second)."""
    from rich.progress import track

    from sqaudio.codec import Codec, code_files, write_codes
    from sqaudio.outputs import check_free, find_inputs, targets

    found = find_inputs(inputs)
    names = targets(found, output, ".npy", file_ok=False)
    check_free([f for name in names for f in code_files(name, fmt)], overwrite)
    _note_inputs(found)
    codec = Codec(model, None, device)
    fallbacks = []
    for path, name in track(list(zip(found.files, names)), description="encode", console=console,
                            disable=len(names) == 1):
        enc = codec.encode(path, speaker)
        fallbacks += [path] if enc.speaker_from == "fallback" else []
        write_codes(name, codec, enc, fmt)
    _note_speakers(codec, fallbacks)
    _say_wrote(f"codes of {len(names)} file(s) ({fmt})", output)


@app.command()
def decode(
    codes: list[Path] = typer.Argument(..., help="Code files (.npy with .json header) or folders of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .wav (one input) or folder (the inputs' "
                                                            "relative folders are kept)."),
    model: Path = _MODEL_OPT,
    vocoder: str = _VOCODER_OPT,
    speaker: Optional[str] = typer.Option(None, "--speaker", help="Decode with this training speaker instead of the header's."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    overwrite: bool = _OVERWRITE_OPT,
) -> None:
    """Codes -> decoder -> vocoder -> wavs."""
    from contextlib import nullcontext

    from sqaudio.codec import Codec, read_codes
    from sqaudio.outputs import check_free, find_inputs, targets

    found = find_inputs(codes, lambda p: p.suffix.lower() == ".npy", companions=(".json",), what="codes (.npy)")
    wavs = targets(found, output, ".wav")
    check_free(wavs, overwrite)
    _note_inputs(found)
    codec = Codec(model, vocoder, device)
    for i, (path, target) in enumerate(zip(found.files, wavs)):
        console.print(f"decode {i + 1}/{len(wavs)}: {escape(str(path))}", highlight=False)
        indices, header = read_codes(path)
        codec.check_header(header, path)
        progress, step = _long_progress(codec, int(header["samples"]), path.name, encode=False)
        with progress or nullcontext():
            codec.decode_to(indices, speaker or header["speaker"], int(header["samples"]), target, step)
    _say_wrote(f"{len(wavs)} wav(s)", output if len(wavs) > 1 or output.suffix.lower() != ".wav" else wavs[0])


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


@vocoder_app.command("export")
def vocoder_export(
    source: Path = typer.Argument(..., help="A `sqaudio vocoder train` directory (newest checkpoint) or checkpoint file."),
    out: Path = typer.Argument(..., help="Generator-only checkpoint to write (.pt); pass it to --vocoder."),
    overwrite: bool = _OVERWRITE_OPT,
) -> None:
    """Write a generator-only vocoder file for inference (no discriminator or optimizer states)."""
    from sqaudio.outputs import check_free
    from sqaudio.vocoder import export_generator

    if out.suffix.lower() != ".pt":
        raise UserError(f"{out}: the exported vocoder is a .pt file")
    check_free([out], overwrite)
    src = export_generator(source, out)
    size = "{:.1f} MB".format
    _say_wrote(f"generator of {src.name} ({size(src.stat().st_size / 1e6)} -> {size(out.stat().st_size / 1e6)})", out)


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

    import signal

    features = parse_feature_options(recipe, overrides)
    received = [signal.SIGINT]

    def terminate(signum, frame):  # SIGTERM stops like Ctrl-C (finished utterances kept), exit 128 + 15
        received[0] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        run_prepare(corpus_dir, out_dir, corpus, mic, test_fraction, workers, features, split_files or None, seed,
                    quiet, console, _parse_shard(shard), device)
    except KeyboardInterrupt:
        console.print("interrupted: finished utterances are kept; run the same command again to continue")
        raise typer.Exit(128 + received[0]) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


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
