"""`sqaudio prepare`, `merge-stores` and `data`: corpora and datasets -> what training reads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sqaudio.cli.app import app, console
from sqaudio.errors import UserError


@app.command()
def prepare(
    corpus_dir: Path = typer.Argument(..., help="Corpus folder: VCTK 0.80/0.92 (holding wav48/ or wav48_silence_trimmed/), "
                                                "ZeroSpeech 2019 (holding english/), or <speaker>/ folders of audio."),
    out_dir: Path = typer.Argument(..., help="Feature store to write (manifest.jsonl, features/, packed/, "
                                             "feature_config.json, speakers.json, skipped.jsonl). Re-running resumes."),
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
    batch_seconds: Optional[float] = typer.Option(None, "--batch-seconds", help="With --device other than cpu: the "
                                                  "most padded audio in one batch there, in seconds (default 600; "
                                                  "a batch that runs out of memory is halved and retried)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary tables."),
) -> None:
    """Compute the paper's log-mel features of a corpus (parallel, resumable) into a feature store."""
    import signal

    from sqaudio.data.prepare import PrepareOptions
    from sqaudio.data.prepare import prepare as run_prepare

    features = _feature_options(recipe, overrides)
    options = PrepareOptions(layout=corpus, mic=mic, test_fraction=test_fraction, seed=seed, split_files=split_files,
                             workers=workers, shard=_parse_shard(shard), device=device,
                             batch_seconds=batch_seconds, quiet=quiet)
    received = [signal.SIGINT]

    def terminate(signum, frame):  # SIGTERM stops like Ctrl-C (finished utterances kept), exit 128 + 15
        received[0] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        run_prepare(corpus_dir, out_dir, features=features, options=options, console=console)
    except KeyboardInterrupt:
        console.print("interrupted: finished utterances are kept; run the same command again to continue")
        raise typer.Exit(128 + received[0]) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _feature_options(recipe: Optional[str], overrides: list[str]):
    """FeatureConfig from a recipe's `features` section (or the defaults) with `key=value` overrides
    (`n_mels=40` or `features.n_mels=40`)."""
    from sqaudio.config import FeatureConfig, apply_overrides, from_dict, load_recipe, to_dict

    base = to_dict(load_recipe(recipe).features) if recipe else to_dict(FeatureConfig())
    items = [item if item.startswith("features.") else f"features.{item}" for item in overrides]
    data = apply_overrides({"features": base}, items)["features"]
    return from_dict(FeatureConfig, data, "features")  # `prepare` checks it before anything is written


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
    from sqaudio.data.prepare import merge_stores as run_merge

    run_merge(out_dir, shards, quiet)


data_app = typer.Typer(help="Dataset helpers: put image data into the layout torchvision reads.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _convert_idx(src: Path, out_root: Path, folder: str) -> None:
    from rich.progress import Progress
    from rich.table import Table

    from sqaudio.data.images import convert_idx_gz, idx_sources

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
