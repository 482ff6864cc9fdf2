"""`sqaudio evaluate`, `compare` and `report`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from sqaudio.cli.app import DEVICE_OPT, OVERWRITE_OPT, app, console, out_json, say_wrote
from sqaudio.errors import UserError


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Run directory (newest checkpoint) or checkpoint file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared features dir (speech) or image dataset root."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate (speech)."),
    eval_list: Optional[Path] = typer.Option(None, "--list", help="Evaluation list JSON of (path without extension, speaker) rows, the reference format (speech)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Images: PNG with originals above reconstructions."),
    device: str = DEVICE_OPT,
    audio: bool = typer.Option(False, "--audio", help="Speech: also resynthesize every utterance (codes -> decoder -> "
                               "--vocoder) and score it against the original audio: pesq_wb, stoi, estoi, si_sdr_db, "
                               "mel_distance_db2 (see docs/report.md)."),
    vocoder: str = typer.Option("griffin-lim", "--vocoder", help="With --audio: griffin-lim, a `sqaudio vocoder train` "
                                "dir, or a pretrained parallel-wavegan dir."),
    overwrite: bool = OVERWRITE_OPT,
    abx: Optional[Path] = typer.Option(None, "--abx", help="Speech: score the codes the ZeroSpeech 2019 way on this "
                                       ".item file instead (ABX error, official bitrate; see docs/abx.md)."),
    wavs: Optional[Path] = typer.Option(None, "--wavs", help="With --abx: folder of the audio files the item file "
                                        "names (searched recursively), e.g. the challenge's english/test."),
    abx_distances: list[str] = typer.Option(["codes"], "--abx-distance", help="With --abx: frame distance, codes "
                                            "(angle between codebook vectors), symbols (0/1) or continuous (angle "
                                            "between encoder outputs); repeat to score several."),
    bitrate_list: Optional[Path] = typer.Option(None, "--bitrate-list", help="With --abx: compute the bitrate over "
                                                "the files and seconds of this list (the challenge's "
                                                "bitrate_filelist.txt) instead of the item file's files."),
) -> None:
    """Mel-MSE in dB^2 (paper Table 3) or image MSE, with perplexity, used codes and bitrate; with --abx, the
    ZeroSpeech 2019 ABX error and bitrate of the codes.

    The result is also kept in the run directory as eval-<split>.json, or eval-list-<list name>.json with --list
    (what compare reads), or eval-abx-<item name>.json with --abx."""
    if abx is not None or wavs is not None or bitrate_list is not None:
        others = [flag for flag, given in (("--data", data), ("--list", eval_list), ("--grid", grid), ("--audio", audio))
                  if given]
        if abx is None or others:
            raise UserError(f"{others[0]} does not go with --abx: run the two evaluations separately" if others
                            else "--wavs and --bitrate-list go with --abx ITEM_FILE")
        return _evaluate_abx(model, abx, wavs, abx_distances, bitrate_list, json_path, device, overwrite)
    from sqaudio.distributed import pick_device
    from sqaudio.evaluation.metrics import evaluate as run_evaluation
    from sqaudio.evaluation.metrics import print_table
    from sqaudio.evaluation.runs import load_run, result_path, save_result
    from sqaudio.files import check_free

    check_free([p for p in (json_path, grid) if p is not None], overwrite)
    result_path(model if model.is_dir() else model.parent, split, eval_list)  # refuse a clash before evaluating
    dev = pick_device(device)
    run = load_run(model, dev)
    inputs = _data(run, data, "audio metrics need" if audio else "speech evaluation needs")
    listed = str(eval_list) if eval_list else None
    audio_result = {}
    if audio:
        from sqaudio.codec.codec import Codec
        from sqaudio.codec.vocoders import load_vocoder
        from sqaudio.evaluation.audio import evaluate_audio

        codec = Codec(run.model, run.state, load_vocoder(vocoder, dev))
        audio_result = evaluate_audio(codec, inputs, split, listed)
    result = run_evaluation(run, inputs, split, listed, str(grid) if grid else None)
    result.update(audio_result)
    print_table({model.name: result}, f"evaluation ({f'list {eval_list.name}' if eval_list else split})")
    say_wrote("result (kept with the run)", save_result(run.run_dir, result))
    if json_path is not None:
        say_wrote("JSON", out_json(result, json_path))
    if grid is not None:
        say_wrote("image grid", grid)


def _evaluate_abx(model: Path, item: Path, wavs: Optional[Path], distances: list[str], bitrate_list: Optional[Path],
                  json_path: Optional[Path], device: str, overwrite: bool) -> None:
    """`evaluate --abx`: read and check the item file (and bitrate list) and find their audio before loading the
    run; score; keep the result with the run as eval-abx-<item name>.json and print a summary."""
    from sqaudio.distributed import pick_device
    from sqaudio.evaluation.abx import abx_result_path, evaluate_abx, leaderboard
    from sqaudio.evaluation.items import check_contexts, find_audio, read_bitrate_list, read_items
    from sqaudio.evaluation.runs import load_run
    from sqaudio.files import check_free

    if wavs is None:
        raise UserError("--abx needs --wavs DIR: the folder of the audio files the item file names")
    check_free([json_path] if json_path is not None else [], overwrite)
    items = read_items(item)
    check_contexts(items)
    audio = find_audio(items.files, wavs, item)
    listed = None
    if bitrate_list is not None:
        rows = read_bitrate_list(bitrate_list)
        listed = list(zip(find_audio([name for name, _ in rows], wavs, bitrate_list), [s for _, s in rows]))
    saved = abx_result_path(model if model.is_dir() else model.parent, item)  # refuse a clash before scoring
    run = load_run(model, pick_device(device))
    if not run.speech:
        raise UserError(f"--abx scores speech codes; {model} is an image model")
    result = evaluate_abx(run, items, audio, distances, listed)
    result["leaderboard"] = leaderboard(result)
    _print_abx(result, f"ZeroSpeech 2019 scores ({item.name})")
    say_wrote("result (kept with the run)", out_json(result, saved))
    if json_path is not None:
        say_wrote("JSON", out_json(result, json_path))


def _print_abx(result: dict[str, Any], title: str) -> None:
    """Summary table: ABX errors per distance, bitrates, sizes and times."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("distance", "ABX across %", "ABX within %", "triplets", "item pairs", "score s"):
        table.add_column(column, justify="right")
    for name, r in result["abx"].items():
        table.add_row(name, _pct(r["abx_across_pct"]), _pct(r["abx_within_pct"]),
                      str(r["triplets_across"] + r["triplets_within"]), str(r["item_pairs"]), f"{r['score_seconds']:.1f}")
    out = Console()
    out.print(table)
    out.print(f"bitrate: {result['zerospeech_bitrate_bps']:.1f} bps ZeroSpeech (entropy {result['code_entropy_bits']:.2f} "
              f"bits x {result['symbols_per_second']:.1f} symbols/s over {result['bitrate_files']} files), "
              f"{result['bitrate_bps']:.0f} bps nominal; {result['items']} items in {result['files']} files encoded in "
              f"{result['encode_seconds']:.1f} s", highlight=False)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _data(run, data: Optional[Path], needs: str):
    """What `run` is evaluated on, opened once: the feature store (speech runs; a UserError says `needs` --data
    without one) or the image dataset root as given (image runs)."""
    if not run.speech:
        return data
    if data is None:
        raise UserError(f"{needs} --data FEATURES_DIR (the output of `sqaudio prepare`)")
    from sqaudio.data.store import open_store

    return open_store(data)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories (each evaluated before, or give --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluate every run on this data now."),
    split: str = typer.Option("test", "--split", help="Split whose saved results are compared."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a bar chart of the metrics here."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write all results as JSON here."),
    device: str = DEVICE_OPT,
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Side-by-side table of several runs, like the paper's Table 3. Columns are named by the shortest
    distinct end of each run's path (runs/a/x and runs/b/x -> a/x, b/x)."""
    import json

    from sqaudio.distributed import pick_device
    from sqaudio.evaluation.metrics import evaluate as run_evaluation
    from sqaudio.evaluation.metrics import print_table
    from sqaudio.evaluation.runs import load_run, result_path, run_names, save_result
    from sqaudio.files import check_free
    from sqaudio.plots import compare_plot

    names = run_names(runs)
    check_free([p for p in (png, json_path) if p is not None], overwrite)
    dev = pick_device(device) if data is not None else None
    opened: dict[bool, Any] = {}  # what --data is for speech runs (the store) and image runs, each opened once
    rows = {}
    for name, path in zip(names, runs):
        saved = result_path(path, split)
        if data is not None:
            run = load_run(path, dev, name)
            if run.speech not in opened:
                opened[run.speech] = _data(run, data, "speech evaluation needs")
            rows[name] = run_evaluation(run, opened[run.speech], split, quiet=True)
            save_result(path, rows[name])
        elif saved.is_file():
            rows[name] = json.loads(saved.read_text())
        else:
            raise UserError(f"{path} has no {saved.name}: run `sqaudio evaluate {path} --data ...` or pass --data")
        rows[name]["run"] = str(path)
    print_table(rows, f"comparison ({split})")
    if png is not None:
        say_wrote("chart", compare_plot(rows, png))
    if json_path is not None:
        say_wrote("JSON", out_json(rows, json_path))

@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to compare (speech runs, or image runs)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared features dir (speech) or image dataset root."),
    out: Path = typer.Option(..., "--out", help="Report folder: index.html, metrics.json, audio/, img/."),
    vocoder: str = typer.Option("griffin-lim", "--vocoder", help="griffin-lim, a `sqaudio vocoder train` dir, or a "
                                "pretrained parallel-wavegan dir."),
    utterances: int = typer.Option(4, "--utterances", min=1, help="Test utterances to listen to (spread over speakers)."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate and listen to (speech)."),
    device: str = DEVICE_OPT,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """A static listening page (no server, works offline): metrics table, players, mels, codes, curves, settings."""
    from sqaudio.distributed import pick_device
    from sqaudio.evaluation.report import build_report, report_kind
    from sqaudio.evaluation.runs import load_runs

    dev = pick_device(device)
    loaded = load_runs(runs, dev)
    speech = report_kind(loaded) == "speech"
    store, voc = (_speech_inputs(data, vocoder, dev) if speech else (data, None))
    index = build_report(loaded, out, store, voc, utterances, split, quiet)
    console.print(f"wrote the report: {index} (open it in a browser)")


def _speech_inputs(data: Optional[Path], vocoder: str, device):
    """The feature store and the vocoder of a speech report, each opened once for every run."""
    from sqaudio.codec.vocoders import load_vocoder
    from sqaudio.data.store import open_store

    if data is None:
        raise UserError("a report of speech runs needs --data FEATURES_DIR (the output of `sqaudio prepare`)")
    store = open_store(data)
    return store, load_vocoder(vocoder, device, store.features)
