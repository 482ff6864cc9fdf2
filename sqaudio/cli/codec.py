"""`sqaudio reconstruct`, `encode` and `decode`: audio -> codes -> audio with a trained model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from sqaudio.cli.app import DEVICE_OPT, OVERWRITE_OPT, app, console, say_wrote

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
    """The input's length at the model's rate from its header, for the progress bar (0 when unreadable: the codec
    says why). This header read and the codec's two streaming passes are the only times an input is opened."""
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
    device: str = DEVICE_OPT,
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Audio -> codes -> decoder -> vocoder -> 16 kHz wav of the input's duration (long files in bounded memory)."""
    from rich.table import Table

    from sqaudio.codec.codec import Codec
    from sqaudio.files import check_free, find_inputs, targets

    found = find_inputs(inputs)
    wavs = targets(found, output, ".wav")
    plots = targets(found, plot, ".png", "--plot") if plot is not None else []
    check_free(wavs + plots, overwrite)
    _note_inputs(found)
    codec = Codec.load(model, vocoder, device)
    table = Table("file", "speaker", "codes used", "bitrate (bit/s)", "mel-MSE (dB^2)", "output", title="reconstructed")
    fallbacks = []
    for i, path in enumerate(found.files):
        rec = _reconstruct_one(codec, path, speaker, wavs[i], plots[i] if plots else None, f"{i + 1}/{len(wavs)}")
        table.add_row(str(found.relative[i]), rec.encoded.speaker, f"{rec.codes_used}/{rec.latent_frames}",
                      f"{rec.bitrate_bps:.0f}", f"{rec.mel_mse_db2:.2f}", str(wavs[i]))
        fallbacks += [path] if rec.encoded.speaker_fallback else []
    _note_speakers(codec, fallbacks)
    Console().print(table)
    if plot is not None:
        say_wrote(f"{len(plots)} mel plot(s)", plot)


def _reconstruct_one(codec, path: Path, speaker: Optional[str], target: Path, plot: Optional[Path], label: str):
    """One input reconstructed into `target` (and its mel plot), under a progress bar when it is long."""
    from contextlib import nullcontext

    from sqaudio.plots import plot_mels

    console.print(f"reconstruct {label}: {escape(str(path))}", highlight=False)
    progress, step = _long_progress(codec, _audio_samples(codec, path), path.name)
    with progress or nullcontext():  # flat memory: the wav is written block by block (the mels only for --plot)
        rec = codec.reconstruct_to(path, target, speaker, step, keep_mels=plot is not None)
    if plot is not None:
        plot_mels(rec.encoded.mel, rec.mel_hat[0].cpu().numpy(), plot, title=path.name,
                  top_db=codec.features.top_db, frame_rate=codec.features.frame_rate)
    return rec


@app.command()
def encode(
    inputs: list[Path] = typer.Argument(..., help="Audio files or folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Codes folder (the inputs' relative folders are kept)."),
    model: Path = _MODEL_OPT,
    fmt: str = typer.Option("npy", "--format", help="npy (indices + JSON header) or zerospeech (one vector per line)."),
    speaker: Optional[str] = typer.Option(None, "--speaker",
                                          help="Speaker stored in the header. " + _SPEAKER_HELP.split(". ", 1)[1]),
    device: str = DEVICE_OPT,
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Audio -> discrete code indices per latent frame (50 per second)."""
    from rich.progress import track

    from sqaudio.codec.codec import Codec
    from sqaudio.codec.codes import code_files, write_codes
    from sqaudio.files import check_free, find_inputs, targets

    found = find_inputs(inputs)
    names = targets(found, output, ".npy", file_ok=False)
    check_free([f for name in names for f in code_files(name, fmt)], overwrite)
    _note_inputs(found)
    codec = Codec.load(model, None, device)
    fallbacks = []
    for path, name in track(list(zip(found.files, names)), description="encode", console=console,
                            disable=len(names) == 1):
        enc = codec.encode(path, speaker)
        fallbacks += [path] if enc.speaker_fallback else []
        write_codes(name, codec, enc, fmt)
    _note_speakers(codec, fallbacks)
    say_wrote(f"codes of {len(names)} file(s) ({fmt})", output)


@app.command()
def decode(
    codes: list[Path] = typer.Argument(..., help="Code files (.npy with .json header) or folders of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .wav (one input) or folder (the inputs' "
                                                            "relative folders are kept)."),
    model: Path = _MODEL_OPT,
    vocoder: str = _VOCODER_OPT,
    speaker: Optional[str] = typer.Option(None, "--speaker", help="Decode with this training speaker instead of the header's."),
    device: str = DEVICE_OPT,
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Codes -> decoder -> vocoder -> wavs."""
    from contextlib import nullcontext

    from sqaudio.codec.codec import Codec
    from sqaudio.codec.codes import read_codes
    from sqaudio.files import check_free, find_inputs, targets

    found = find_inputs(codes, lambda p: p.suffix.lower() == ".npy", companions=(".json",), what="codes (.npy)")
    wavs = targets(found, output, ".wav")
    check_free(wavs, overwrite)
    _note_inputs(found)
    codec = Codec.load(model, vocoder, device)
    for i, (path, target) in enumerate(zip(found.files, wavs)):
        console.print(f"decode {i + 1}/{len(wavs)}: {escape(str(path))}", highlight=False)
        indices, header = read_codes(path)
        codec.check_header(header, path)
        progress, step = _long_progress(codec, int(header["samples"]), path.name, encode=False)
        with progress or nullcontext():
            codec.decode_to(indices, speaker or header["speaker"], int(header["samples"]), target, step)
    say_wrote(f"{len(wavs)} wav(s)", output if len(wavs) > 1 or output.suffix.lower() != ".wav" else wavs[0])
