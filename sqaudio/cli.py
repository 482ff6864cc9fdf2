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
    """Turns a UserError from any command into one red line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
            raise typer.Exit(2) from None


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


def main() -> None:
    """Console-script entry point."""
    app()
