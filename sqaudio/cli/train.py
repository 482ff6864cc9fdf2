"""`sqaudio train` and `sqaudio recipes`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sqaudio.cli.app import DEVICE_OPT, DEVICES_OPT, QUIET_OPT, RESUME_OPT, SET_OPT, app
from sqaudio.errors import UserError


@app.command()
def train(
    command: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped name, e.g. vctk/sqvae_gauss4 (see `sqaudio recipes`)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared features dir (speech) or image dataset root."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, config.yaml, TensorBoard, plots."),
    overrides: list[str] = SET_OPT,
    resume: bool = RESUME_OPT,
    device: str = DEVICE_OPT,
    quiet: bool = QUIET_OPT,
    devices: int = DEVICES_OPT,
) -> None:
    """Train an SQ-VAE (or a VQ-VAE baseline) from a recipe. Ctrl-C/SIGTERM saves and exits 128 + signal."""
    from sqaudio.config import load_recipe
    from sqaudio.training.sqvae import check_launch
    from sqaudio.training.sqvae import train as run_training

    cfg = load_recipe(recipe, overrides)
    if cfg.data.kind == "speech" and data is None:
        raise UserError("speech training needs --data FEATURES_DIR (the output of `sqaudio prepare`)")
    if devices != 1:
        from sqaudio.distributed import relaunch

        check_launch(cfg, data, devices, device, resume)  # reported once, before any process starts
        raise typer.Exit(relaunch(command, devices))
    result = run_training(cfg, data, out, resume=resume, device=device, quiet=quiet, overrides=overrides)
    if result.signal is not None:
        raise typer.Exit(128 + result.signal)


@app.command()
def recipes() -> None:
    """List the shipped recipes (SQ-VAE recipes for `train`, then vocoder recipes for `vocoder train`)."""
    from sqaudio.config import VOCODER_DIR, list_recipes

    for name in list_recipes():
        typer.echo(name)
    typer.echo("# vocoder recipes (sqaudio vocoder train FEATURES --recipe NAME):")
    for name in list_recipes(VOCODER_DIR):
        typer.echo(f"{VOCODER_DIR}/{name}")
