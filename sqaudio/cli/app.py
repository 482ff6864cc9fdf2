"""The one Typer app, its error handling (one red line, exit 2) and what every command module shares."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from sqaudio import __version__
from sqaudio.errors import UserError

console = Console(stderr=True)


# The commands in pipeline order (`sqaudio --help` lists them so); each module of sqaudio.cli registers its own.
COMMANDS = ["prepare", "merge-stores", "data", "train", "recipes", "evaluate", "compare", "report", "encode",
            "decode", "reconstruct", "vocoder", "demo"]


class _Group(TyperGroup):
    """Turns a UserError (or an OS error such as a full disk) into one red line on stderr and exit code 2."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMANDS.index(n) if n in COMMANDS else len(COMMANDS))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as err:
            report(str(err) if isinstance(err, UserError) else _os_message(err))
            raise typer.Exit(2) from None


def report(message: str) -> None:
    """One red line on stderr; a rank started by `--devices` hands it to its launcher instead, which prints one
    line for the whole job."""
    from sqaudio.distributed import report_to_launcher

    if not report_to_launcher(message):
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


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
    """sqaudio: prepare | merge-stores | data | train | recipes | evaluate | compare | report | encode | decode |
    reconstruct | vocoder | demo."""


def out_json(result: dict, path: Path) -> Path:
    import json

    from sqaudio.files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return path


# Options several commands share, defined once.
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace outputs that exist already (default: refuse).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
SET_OPT = typer.Option([], "--set", help="Override a recipe key, e.g. --set train.steps=1000.")
RESUME_OPT = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out.")
QUIET_OPT = typer.Option(False, "--quiet", help="No progress bar or summary.")
DEVICES_OPT = typer.Option(1, "--devices",
                           help="Processes on this machine (DDP via torchrun); see docs/distributed.md.")


def say_wrote(what: str, path: Path) -> None:
    """Summary line on stdout: where an output went."""
    Console().print(f"wrote {what}: {escape(str(path))}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()
