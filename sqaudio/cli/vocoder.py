"""`sqaudio vocoder train | info | export`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sqaudio.cli.app import DEVICE_OPT, DEVICES_OPT, OVERWRITE_OPT, QUIET_OPT, RESUME_OPT, SET_OPT, app, say_wrote
from sqaudio.errors import UserError

vocoder_app = typer.Typer(help="Neural vocoders (parallel-wavegan) for the prepared features.", no_args_is_help=True)
app.add_typer(vocoder_app, name="vocoder")


@vocoder_app.command("train")
def vocoder_train(
    command: typer.Context,
    features_dir: Path = typer.Argument(..., help="Prepared feature store (`sqaudio prepare` output)."),
    out: Path = typer.Option(..., "--out", help="Vocoder directory (checkpoints, config.yaml, logs/)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="hifigan (default), tiny, parallel_wavegan, melgan, "
                                                               "multiband_melgan, stylemelgan, or a YAML path."),
    overrides: list[str] = SET_OPT,
    resume: bool = RESUME_OPT,
    device: str = DEVICE_OPT,
    quiet: bool = QUIET_OPT,
    devices: int = DEVICES_OPT,
) -> None:
    """Train a GAN vocoder (HiFi-GAN by default) on the store's normalised log-mel -> 16 kHz waveform."""
    from sqaudio.codec.vocoders import load_vocoder_config
    from sqaudio.data.store import open_store
    from sqaudio.training.vocoder import check_launch, train_vocoder

    if resume and recipe is not None:
        raise UserError("--recipe cannot be combined with --resume (the run's saved config is used; "
                        "change settings such as train.steps with --set)")
    store = open_store(features_dir)
    config = None if resume else load_vocoder_config(recipe or "hifigan", overrides)
    if devices != 1:
        from sqaudio.distributed import relaunch

        check_launch(store, config, devices, device)  # reported once, before any process starts
        raise typer.Exit(relaunch(command, devices))
    result = train_vocoder(store, out, config, overrides, resume, device, quiet)
    if result.signal is not None:  # stopped by SIGINT/SIGTERM after saving a checkpoint
        raise typer.Exit(128 + result.signal)


@vocoder_app.command("info")
def vocoder_info(
    path: str = typer.Argument(..., help="griffin-lim, a vocoder dir or checkpoint, or a parallel-wavegan dir."),
) -> None:
    """Show a vocoder's type, checkpoint and the features it takes."""
    from rich.table import Table

    from sqaudio.codec.vocoders import load_vocoder

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
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Write a generator-only vocoder file for inference (no discriminator or optimizer states)."""
    from sqaudio.codec.vocoders import export_generator
    from sqaudio.files import check_free

    if out.suffix.lower() != ".pt":
        raise UserError(f"{out}: the exported vocoder is a .pt file")
    check_free([out], overwrite)
    src = export_generator(source, out)
    size = "{:.1f} MB".format
    say_wrote(f"generator of {src.name} ({size(src.stat().st_size / 1e6)} -> {size(out.stat().st_size / 1e6)})", out)
