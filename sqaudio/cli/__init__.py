"""The sqaudio command line: one Typer app (`sqaudio.cli.app`), one module per command group. Heavy modules
are imported inside commands (a fast --help)."""
from sqaudio.cli import codec, data, demo, evaluate, train, vocoder  # noqa: F401  (each registers its commands)
from sqaudio.cli.app import app, main

__all__ = ["app", "main"]
