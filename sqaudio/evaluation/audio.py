"""Objective quality of resynthesized speech against the original waveform.

Every function takes (reference, estimate): two mono float waveforms of equal length at `rate` Hz.
    si_sdr_db         scale-invariant signal-to-distortion ratio (Le Roux et al., 2019), mean removed
    pesq_wb           wideband PESQ (ITU-T P.862.2, package `pesq`), MOS-LQO 1.04 .. 4.64; at 16 kHz
    stoi / estoi      short-time objective intelligibility and its extended version (package `pystoi`), 0 .. 1
    mel_distance_db2  mean squared difference of the two signals' sqaudio log-mels, in dB^2 (the Table 3 unit)
A phase-free vocoder such as Griffin-Lim scores low on SI-SDR whatever the mel quality: SI-SDR compares
waveforms sample by sample. PESQ and STOI compare perceptual / envelope representations instead.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from sqaudio.config import FeatureConfig
from sqaudio.errors import UserError
from sqaudio.evaluation.entries import speech_entries

if TYPE_CHECKING:
    from sqaudio.data.store import Store

PESQ_RATE = 16000  # wideband PESQ is defined at 16 kHz
EPS = 1e-12
METRIC_KEYS = ("pesq_wb", "stoi", "estoi", "si_sdr_db", "mel_distance_db2")


def _pair(reference: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, est = np.asarray(reference, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    if ref.ndim != 1 or ref.shape != est.shape or ref.size == 0:
        raise UserError(f"audio metrics need two mono signals of one length, got shapes {ref.shape} and {est.shape}")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(est))):
        raise UserError("audio metrics got NaN or infinite samples")
    return ref, est


def si_sdr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """10 log10(|a s|^2 / |a s - s_hat|^2) with a = <s_hat, s> / |s|^2, both signals mean-removed."""
    ref, est = _pair(reference, estimate)
    ref, est = ref - ref.mean(), est - est.mean()
    target = (est @ ref) / (ref @ ref + EPS) * ref
    return float(10 * np.log10((target @ target + EPS) / ((est - target) @ (est - target) + EPS)))


def pesq_wb(reference: np.ndarray, estimate: np.ndarray, rate: int) -> float | None:
    """Wideband PESQ; None when PESQ finds no speech in the reference (silence, a too-short signal)."""
    from pesq import PesqError, pesq

    ref, est = _pair(reference, estimate)
    if rate != PESQ_RATE:
        from sqaudio.data.audio import resample

        ref, est = (resample(torch.from_numpy(x), rate, PESQ_RATE).numpy() for x in (ref, est))
    score = pesq(PESQ_RATE, ref.astype(np.float32), est.astype(np.float32), "wb", on_error=PesqError.RETURN_VALUES)
    return float(score) if score >= 0 else None  # negative values are PESQ's error codes


def stoi(reference: np.ndarray, estimate: np.ndarray, rate: int, extended: bool = False) -> float | None:
    """STOI (or eSTOI with extended=True); None when the signals hold under 30 speech frames (384 ms)."""
    from pystoi import stoi as _stoi

    ref, est = _pair(reference, estimate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(_stoi(ref, est, rate, extended=extended))
    too_short = any("Not enough STFT frames" in str(w.message) for w in caught)
    return None if too_short or not math.isfinite(score) else score


def mel_distance_db2(reference: np.ndarray, estimate: np.ndarray, features: FeatureConfig) -> float:
    """Mean over mels and frames of (log-mel(estimate) - log-mel(reference))^2, in dB^2."""
    from sqaudio.data.features import log_mel_spectrogram

    ref, est = _pair(reference, estimate)
    diff = log_mel_spectrogram(est, features) - log_mel_spectrogram(ref, features)
    return float(np.mean(diff.astype(np.float64) ** 2) * features.top_db**2)


def audio_metrics(reference: np.ndarray, estimate: np.ndarray, features: FeatureConfig) -> dict[str, float | None]:
    """All metrics of one utterance (keys METRIC_KEYS) at features.sample_rate."""
    rate = features.sample_rate
    return {"pesq_wb": pesq_wb(reference, estimate, rate), "stoi": stoi(reference, estimate, rate),
            "estoi": stoi(reference, estimate, rate, extended=True), "si_sdr_db": si_sdr_db(reference, estimate),
            "mel_distance_db2": mel_distance_db2(reference, estimate, features)}


def mean_metrics(rows: list[dict[str, float | None]]) -> dict[str, float | int | None]:
    """Mean of each metric over utterances (undefined values left out and counted as `<key>_undefined`)."""
    out: dict[str, float | int | None] = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
        if len(values) < len(rows):
            out[f"{key}_undefined"] = len(rows) - len(values)
    return out


@dataclass
class Resynthesis:
    """One test utterance through a codec: original and resynthesized audio, features and codes."""

    wav: np.ndarray       # (samples,) original at the feature sample rate
    wav_hat: np.ndarray   # (samples,) codes -> decoder -> vocoder
    mel: np.ndarray       # (n_mels, frames) the store's input features, frame count trimmed to even
    mel_hat: np.ndarray   # (n_mels, frames - 2) decoder output (it predicts mel[:, 1:-1])
    codes: np.ndarray     # (frames / 2,) int64 code indices


@torch.no_grad()
def resynthesize(codec, store: Store, entry: dict[str, Any]) -> Resynthesis:
    """Encode an utterance's prepared features, decode them with its speaker, vocode to its source's length
    (`codec`: a `sqaudio.codec.codec.Codec` with a vocoder)."""
    wav = store.source_audio(entry)
    if len(wav) // codec.features.hop_length + 1 != entry["frames"]:
        raise UserError(f"{entry['source']} no longer matches its prepared features in {store.root} (run prepare again)")
    mel = store.load(entry)
    mel = mel[:, : mel.shape[1] - mel.shape[1] % 2]
    codes, _ = codec.model.encode({"mel": torch.from_numpy(mel)[None].to(codec.device)})
    codes = codes[0].cpu().numpy().astype(np.int64)
    mel_hat = codec.decode_mel(codes, entry["speaker"])
    return Resynthesis(wav, codec.synthesize(mel_hat, len(wav)), mel, mel_hat[0].float().cpu().numpy(), codes)


def evaluate_audio(codec, store: Store, split: str = "test", eval_list: str | None = None,
                   quiet: bool = False, on_utterance: Callable[[dict, Resynthesis, dict], None] | None = None
                   ) -> dict[str, Any]:
    """Resynthesize every evaluated utterance of `store` through `codec` (a `Codec`: model and vocoder) and average the
    audio metrics (METRIC_KEYS) against the original waveforms. `on_utterance(entry, resynthesis, metrics)` sees
    each one (the report keeps some of them)."""
    from rich.console import Console
    from rich.progress import Progress

    entries, _ = speech_entries(store, codec.features, codec.speakers, split, eval_list)
    for entry in entries:  # a missing source file is named before any work starts
        store.source_path(entry)
    rows = []
    with Progress(console=Console(stderr=True), disable=quiet) as progress:
        task = progress.add_task(f"audio metrics ({codec.vocoder.name})", total=len(entries))
        for entry in entries:
            res = resynthesize(codec, store, entry)
            rows.append(audio_metrics(res.wav, res.wav_hat, codec.features))
            if on_utterance is not None:
                on_utterance(entry, res, rows[-1])
            progress.advance(task)
    return {**mean_metrics(rows), "audio_utterances": len(rows), "vocoder": codec.vocoder.name}
