"""`sqaudio report`: a self-contained static listening page comparing runs (no server, no external assets).

REPORT_DIR/
  index.html          the page: metrics table (one column per run, the paper's Table 3 as a reference row on VCTK
                      or ZeroSpeech data), players for N test utterances, mels, code strips, each run's curves,
                      code usage and training settings; images for image runs
  metrics.json        the table's numbers per run
  audio/<utt>/original.wav, audio/<utt>/<run>.wav      16-bit PCM at the feature sample rate
  img/...             mels, code-usage histograms, self-annealing curves, image grids (PNG)
"""
from __future__ import annotations

import datetime
import html
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sqaudio.codec.codec import Codec
from sqaudio.codec.waveform import write_wav
from sqaudio.errors import UserError
from sqaudio.evaluation.audio import Resynthesis, evaluate_audio
from sqaudio.evaluation.entries import speech_entries
from sqaudio.evaluation.metrics import CodeUsage, evaluate
from sqaudio.plots import plot_mels

if TYPE_CHECKING:
    from sqaudio.codec.vocoders import Vocoder
    from sqaudio.data.store import Store
    from sqaudio.evaluation.runs import TrainedRun

# Paper Table 3 (mel-MSE in dB², mean ± std over runs): (quantizer kind, Gaussian variant) -> {corpus: value}.
PAPER_TABLE3 = {("vq_ema", None): {"vctk": "29.59 ± 0.25", "zerospeech2019": "34.33 ± 1.57"},
                ("gaussian", 1): {"vctk": "25.52 ± 0.08", "zerospeech2019": "33.17 ± 1.11"},
                ("gaussian", 3): {"vctk": "25.94 ± 0.22", "zerospeech2019": "34.35 ± 1.07"},
                ("gaussian", 4): {"vctk": "24.68 ± 0.21", "zerospeech2019": "32.32 ± 0.88"}}
CORPUS_NAMES = {"vctk": "VCTK", "zerospeech2019": "ZeroSpeech 2019"}
# Table rows: key -> (label, which way is better, format)
ROWS = {"mel_mse_db2": ("mel-MSE (dB²)", "lower", ".2f"), "mse_x1e3": ("image MSE ×10³", "lower", ".3f"),
        "accuracy": ("pixel accuracy", "higher", ".4f"), "miou": ("mean IoU", "higher", ".4f"),
        "perplexity": ("code perplexity", "higher", ".1f"), "used_codes": ("codes used", "higher", "d"),
        "bitrate_bps": ("bitrate (bit/s)", None, ".0f"), "pesq_wb": ("PESQ wideband (MOS-LQO)", "higher", ".3f"),
        "stoi": ("STOI", "higher", ".3f"), "estoi": ("extended STOI", "higher", ".3f"),
        "si_sdr_db": ("SI-SDR (dB)", "higher", ".2f"), "mel_distance_db2": ("log-mel distance of the audio (dB²)",
                                                                              "lower", ".1f"),
        "step": ("training steps", None, ",d")}
SETTINGS = [("recipe", ("name",)), ("quantizer", ("quantizer", "kind")), ("variant", ("quantizer", "variant")),
            ("codebook K", ("quantizer", "codebook_size")), ("code dim", ("quantizer", "dim")),
            ("steps planned", ("train", "steps")), ("learning rate", ("train", "lr")),
            ("batch size", ("data", "batch_size")), ("seed", ("train", "seed"))]


@dataclass
class RunPage:
    """What the page shows of one run."""

    name: str
    path: Path
    recipe: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    counts: np.ndarray | None = None
    images: dict[str, str] = field(default_factory=dict)  # caption -> relative path
    speakers: list[str] = field(default_factory=list)      # the run's training speakers (speech)


def safe_name(text: str) -> str:
    """A file-name-safe form of a run or utterance name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def corpus_of(entries: list[dict[str, Any]]) -> str | None:
    """'vctk' or 'zerospeech2019' when the store's sources are laid out as those corpora, else None."""
    parts = [Path(e["source"]).parts for e in entries[:50]]
    if parts and all(any(p.startswith("wav48") for p in ps) for ps in parts):
        return "vctk"
    if parts and all("english" in ps for ps in parts):
        return "zerospeech2019"
    return None


def choose_utterances(entries: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """n entries spread over speakers: the speakers' utterances sorted by id, taken round-robin (deterministic)."""
    by_speaker: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: (e["speaker"], e["id"])):
        by_speaker.setdefault(e["speaker"], []).append(e)
    chosen, queues = [], [list(v) for v in by_speaker.values()]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return chosen


def report_kind(runs: list[TrainedRun]) -> str:
    """"speech" or "images": what all `runs` are (a UserError when they mix the two)."""
    kinds = {run.speech for run in runs}
    if len(kinds) > 1:
        raise UserError("report compares runs of one kind: all speech or all images, not both")
    return "speech" if kinds == {True} else "images"


def build_report(runs: list[TrainedRun], out: Path, data: Store | Path | None, vocoder: Vocoder | None = None,
                 utterances: int = 4, split: str = "test", quiet: bool = False) -> Path:
    """Evaluate every loaded run, write the page and its assets into `out`; returns the path of index.html.

    Args:
        data: speech runs: the feature store (with `vocoder`, loaded once for every run); image runs: the dataset
            root (None: each recipe's).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if utterances < 1:
        raise UserError("--utterances must be at least 1")
    pages = [RunPage(run.name, run.path, run.state["recipe"], speakers=run.speakers) for run in runs]
    speech = report_kind(runs) == "speech"
    if speech:
        if data is None:
            raise UserError("a report of speech runs needs --data FEATURES_DIR (the output of `sqaudio prepare`)")
        body = _speech(pages, runs, data, out, vocoder, utterances, split, quiet)
    else:
        body = _images(pages, runs, data, out, quiet)
    (out / "img").mkdir(parents=True, exist_ok=True)  # nothing is created before the inputs are validated
    for page in pages:
        _run_figures(page, out)
    (out / "metrics.json").write_text(json.dumps({p.name: p.metrics for p in pages}, indent=2))
    index = out / "index.html"
    shown = data.root if speech else data
    index.write_text(render(pages, body, shown, vocoder.name if speech else None, split))
    return index


def _speech(pages: list[RunPage], runs: list[TrainedRun], store: Store, out: Path, vocoder: Vocoder, n: int, split: str,
            quiet: bool) -> dict:
    """Evaluate each run (mel-MSE pass and audio pass); write players, mels and code strips of the chosen ones."""
    vocoder.check_compatible(store.features)  # checked before any work
    per_run = [speech_entries(store, run.model.recipe.features, run.speakers, split)[0] for run in runs]
    for entry in (e for entries in per_run for e in entries):  # every problem is found before any work starts
        store.source_path(entry)
    shared = set.intersection(*({e["id"] for e in entries} for entries in per_run))
    common = [e for e in per_run[0] if e["id"] in shared]
    if not common:
        raise UserError(f"no '{split}' utterance in {store.root} has a speaker that every run knows")
    chosen = choose_utterances(common, n)
    ids = {e["id"]: safe_name(e["id"]) for e in chosen}
    utts: dict[str, dict[str, Any]] = {e["id"]: {"entry": e, "runs": {}} for e in chosen}
    for page, run in zip(pages, runs):
        usage = CodeUsage(page.recipe["quantizer"]["codebook_size"])
        keep = _Keeper(page, store, out, ids, utts, usage)
        audio = evaluate_audio(Codec(run.model, run.state, vocoder), store, split, None, quiet, on_utterance=keep)
        page.metrics = {**evaluate(run, store, split, quiet=quiet), **audio}
        page.counts = usage.counts.numpy()
    return {"utterances": list(utts.values()), "corpus": corpus_of(store.entries)}


@dataclass
class _Keeper:
    """Sees each resynthesized utterance of one run: counts its codes, keeps the chosen ones' audio and mels."""

    page: RunPage
    store: Store
    out: Path
    ids: dict[str, str]                  # chosen utterance id -> file-safe name
    utts: dict[str, dict[str, Any]]      # chosen utterance id -> {"entry", "runs": {run name: what the page shows}}
    usage: CodeUsage

    def __call__(self, entry: dict[str, Any], res: Resynthesis, metrics: dict[str, Any]) -> None:
        self.usage.add(torch.from_numpy(res.codes), None)
        if entry["id"] not in self.ids:
            return
        features, utt, run = self.store.features, self.ids[entry["id"]], safe_name(self.page.name)
        folder = self.out / "audio" / utt
        write_wav(folder / "original.wav", res.wav, features.sample_rate)
        write_wav(folder / f"{run}.wav", res.wav_hat, features.sample_rate)
        mel_png = self.out / "img" / f"mel_{utt}_{run}.png"
        plot_mels(res.mel, res.mel_hat, mel_png, title=f"{entry['id']} — {self.page.name}",
                  top_db=features.top_db, frame_rate=features.frame_rate)
        self.utts[entry["id"]]["runs"][self.page.name] = {"metrics": metrics, "codes": res.codes.tolist(),
                                                          "wav": f"audio/{utt}/{run}.wav",
                                                          "mel": mel_png.relative_to(self.out).as_posix()}


def _images(pages: list[RunPage], runs: list[TrainedRun], data: Path | None, out: Path, quiet: bool) -> dict:
    """Evaluate each image run and keep its grid of originals above reconstructions."""
    for page, run in zip(pages, runs):
        grid = out / "img" / f"grid_{safe_name(page.name)}.png"
        page.metrics = evaluate(run, data, grid=str(grid), quiet=quiet)
        if grid.is_file():
            page.images["test images: originals (top) and reconstructions (bottom)"] = grid.relative_to(out).as_posix()
    return {"utterances": [], "corpus": None}


def _run_figures(page: RunPage, out: Path) -> None:
    """Self-annealing curves (the run's annealing.png, drawn when missing) and the code-usage histogram."""
    from sqaudio.plots import plot_annealing, plot_code_usage

    curves = page.path / "annealing.png"
    if not curves.is_file():
        curves = plot_annealing(page.path, page.name)
    if curves is not None and curves.is_file():
        target = out / "img" / f"annealing_{safe_name(page.name)}.png"
        shutil.copyfile(curves, target)
        page.images["self-annealing curves over training"] = target.relative_to(out).as_posix()
    if page.counts is not None and page.counts.sum() > 0:
        target = out / "img" / f"codes_{safe_name(page.name)}.png"
        plot_code_usage(page.counts, target, title=f"{page.name}: codebook usage on the {page.metrics.get('split', 'test')} split")
        page.images["codebook usage (codes sorted by use)"] = target.relative_to(out).as_posix()


# --- HTML --------------------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not np.isfinite(value):
        return "–"
    try:
        return format(int(value) if spec.endswith("d") else float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def metrics_table(pages: list[RunPage], corpus: str | None) -> str:
    """Metrics as rows, one column per run; the best value of a row is marked; the paper's row where it applies."""
    head = "".join(f"<th scope='col'>{_e(p.name)}</th>" for p in pages)
    rows = []
    for key, (label, better, spec) in ROWS.items():
        values = [p.metrics.get(key) for p in pages]
        if all(v is None for v in values):
            continue
        shown = [_fmt(v, spec) for v in values]
        numbers = [(float(v), text) for v, text in zip(values, shown) if isinstance(v, (int, float))]
        distinct = better and len(numbers) > 1 and len({text for _, text in numbers}) > 1
        best = (max if better == "higher" else min)(numbers)[1] if distinct else None
        cells = "".join(f"<td class='{'best' if text == best else ''}'>{text}</td>" for text in shown)
        hint = f" <span class='better'>{'↑' if better == 'higher' else '↓'}</span>" if better else ""
        rows.append(f"<tr><th scope='row'>{_e(label)}{hint}</th>{cells}</tr>")
        if key == "mel_mse_db2" and corpus:
            paper = [PAPER_TABLE3.get(_paper_key(p.recipe), {}).get(corpus) for p in pages]
            cells = "".join(f"<td>{_e(v) if v else '–'}</td>" for v in paper)
            rows.append(f"<tr class='paper'><th scope='row'>paper Table 3, {CORPUS_NAMES[corpus]} "
                        f"(500k steps)</th>{cells}</tr>")
    return (f"<table class='metrics'><thead><tr><th scope='col'>metric</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _paper_key(recipe: dict[str, Any]) -> tuple[str, int | None]:
    q = recipe["quantizer"]
    return (q["kind"], q["variant"] if q["kind"] == "gaussian" else None)


def code_strip(codes: list[int], size: int) -> str:
    """Codes over time as coloured cells (hue from the code index; the index on hover)."""
    cells = "".join(f"<i style='background:hsl({(c * 137.508) % 360:.0f},62%,{48 + (c * 7) % 20}%)' "
                    f"title='code {c}'></i>" for c in codes)
    return f"<div class='strip' aria-label='{len(codes)} codes of a {size}-code book'>{cells}</div>"


def _utterance(u: dict[str, Any], pages: list[RunPage], size: dict[str, int]) -> str:
    e = u["entry"]
    folder = u["runs"] and next(iter(u["runs"].values()))["wav"].rsplit("/", 1)[0]
    cards = [f"<div class='cell original'><h4>original</h4><audio controls preload='metadata' "
             f"src='{_e(folder)}/original.wav'></audio><p class='small'>{e['duration_s']:.2f} s · speaker "
             f"{_e(e['speaker'])}</p></div>"]
    for p in pages:
        r = u["runs"].get(p.name)
        if r is None:
            continue
        m = r["metrics"]
        scores = " · ".join(f"{label} {_fmt(m.get(k), spec)}" for k, label, spec in
                            (("pesq_wb", "PESQ", ".2f"), ("stoi", "STOI", ".2f"), ("si_sdr_db", "SI-SDR", ".1f")))
        cards.append(f"<div class='cell'><h4>{_e(p.name)}</h4><audio controls preload='metadata' src='{_e(r['wav'])}'>"
                     f"</audio><p class='small'>{scores}</p><img src='{_e(r['mel'])}' alt='input and reconstructed "
                     f"log-mel of {_e(e['id'])} by {_e(p.name)}' loading='eager'>"
                     f"<p class='small'>codes over time ({len(r['codes'])} latent frames)</p>"
                     f"{code_strip(r['codes'], size[p.name])}</div>")
    return (f"<section class='utt'><h3>{_e(e['id'])}</h3><div class='row' style='--n:{len(cards)}'>"
            f"{''.join(cards)}</div></section>")


def _run_section(p: RunPage) -> str:
    settings = "".join(f"<tr><th>{_e(label)}</th><td>{_e(_get(p.recipe, path))}</td></tr>" for label, path in SETTINGS)
    settings += f"<tr><th>trained steps</th><td>{_fmt(p.metrics.get('step'), ',d')}</td></tr>"
    config = p.path / "config.yaml"
    full = config.read_text() if config.is_file() else json.dumps(p.recipe, indent=2)
    figures = "".join(f"<figure class='{'' if 'codes_' in src else 'wide'}'><img src='{_e(src)}' alt='{_e(cap)} of "
                      f"{_e(p.name)}' loading='eager'><figcaption>{_e(cap)}</figcaption></figure>"
                      for cap, src in p.images.items())
    return (f"<section class='run'><h3>{_e(p.name)}</h3><p class='small path'>{_e(p.path.absolute())}</p>"
            f"<div class='runrow'><table class='settings'>{settings}</table><div class='figs'>{figures}</div></div>"
            f"<details><summary>full training configuration</summary><pre>{_e(full)}</pre></details></section>")


def _get(d: dict, path: tuple[str, ...]) -> Any:
    if path == ("quantizer", "variant"):  # only Gaussian SQ has variants (I-IV)
        q = d.get("quantizer", {})
        return ("I", "II", "III", "IV")[q["variant"] - 1] if q.get("kind") == "gaussian" and 1 <= q.get(
            "variant", 0) <= 4 else "–"
    for key in path:
        d = d.get(key, {}) if isinstance(d, dict) else {}
    return "–" if d == {} else d


def render(pages: list[RunPage], body: dict, data: Path | None, vocoder: str | None, split: str) -> str:
    """The whole page as one HTML string (the stylesheet inlined)."""
    css = (Path(__file__).with_name("report.css")).read_text()
    size = {p.name: p.recipe["quantizer"]["codebook_size"] for p in pages}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    about = [f"{len(pages)} run{'s' * (len(pages) > 1)}", f"data <code>{_e(Path(data).absolute())}</code>" if data else "",
             f"split <b>{_e(split)}</b>" if vocoder else "", f"vocoder <b>{_e(vocoder)}</b>" if vocoder else "",
             f"written {when}"]
    listen = ""
    if body["utterances"]:
        utts = "".join(_utterance(u, pages, size) for u in body["utterances"])
        listen = (f"<h2 id='listen'>Listen</h2><p class='note'>{len(body['utterances'])} {_e(split)} utterances "
                  f"spread over speakers. Each reconstruction is the input's codes decoded with the input's speaker "
                  f"and vocoded; its figure shows the input log-mel above the decoded one.</p>{utts}")
    audio_note = ("<p class='note'>Audio metrics compare each resynthesized waveform with the original (mean over "
                  "the split). SI-SDR compares samples, so phase-free vocoders such as Griffin-Lim score low on it "
                  "whatever the mels; PESQ and STOI are perceptual and envelope measures.</p>" if vocoder else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>sqaudio report: {_e(', '.join(p.name for p in pages))}</title><link rel="icon" href="data:,">
<style>{css}</style></head>
<body><header><h1>sqaudio listening report</h1><p>{' · '.join(a for a in about if a)}</p>
<nav><a href="#metrics">metrics</a>{'<a href="#listen">listen</a>' if listen else ''}<a href="#runs">runs</a></nav>
</header><main>
<h2 id="metrics">Metrics</h2>{metrics_table(pages, body['corpus'])}{audio_note}
{listen}
<h2 id="runs">Runs</h2>{''.join(_run_section(p) for p in pages)}
</main><footer>Generated by <code>sqaudio report</code>; SQ-VAE: Takida et al., ICML 2022.</footer></body></html>
"""
