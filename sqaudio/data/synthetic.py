"""A small built-in multi-speaker corpus of speech-like signals (no real corpus can be bundled).

Source-filter synthesis: a glottal pulse train at a per-speaker pitch (with jitter, vibrato and a falling
intonation), plus aspiration noise, through a cascade of four formant resonators whose frequencies move from
vowel to vowel and are scaled per speaker (vocal-tract length); fricative- and plosive-like noise bursts and
pauses between "words". Written as a `folder` corpus: `<out>/<speaker>/<speaker>_<nnn>.wav`, 16 kHz, 16 bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

RATE = 16000
BLOCK = 80  # samples per formant-filter update (5 ms)
# Adult male formant targets F1-F4 (Hz), Peterson & Barney style averages.
VOWELS = {
    "i": (270, 2290, 3010, 3500), "e": (400, 2000, 2550, 3500), "a": (730, 1090, 2440, 3400),
    "o": (570, 840, 2410, 3300), "u": (300, 870, 2240, 3300), "ae": (660, 1720, 2410, 3400),
    "er": (490, 1350, 1690, 3300),
}
BANDWIDTHS = (70.0, 100.0, 130.0, 170.0)


@dataclass(frozen=True)
class Voice:
    """A synthetic speaker.

    Args:
        name: speaker id (folder name).
        f0: mean pitch in Hz.
        formant_scale: multiplies all formant frequencies (shorter vocal tract -> larger).
        jitter: relative period-to-period pitch noise.
        vibrato_hz, vibrato_depth: slow pitch modulation (rate, relative depth).
        breathiness: aspiration noise level relative to the pulses.
    """

    name: str
    f0: float
    formant_scale: float
    jitter: float
    vibrato_hz: float
    vibrato_depth: float
    breathiness: float


def make_voices(n_speakers: int, seed: int = 0) -> list[Voice]:
    """Distinct voices: alternating low/high pitch ranges, per-speaker formant scaling and voice quality."""
    rng = np.random.default_rng([seed, 7919])
    voices = []
    for i in range(n_speakers):
        high = i % 2 == 1
        f0 = rng.uniform(175, 250) if high else rng.uniform(90, 140)
        scale = rng.uniform(1.08, 1.22) if high else rng.uniform(0.88, 1.02)
        jitter, vibrato_hz = rng.uniform(0.005, 0.02), rng.uniform(4.0, 6.5)
        depth, breath = rng.uniform(0.005, 0.02), rng.uniform(0.02, 0.1)
        voices.append(Voice(f"spk{i + 1:02d}", float(f0), float(scale), float(jitter), float(vibrato_hz), float(depth),
                            float(breath)))
    return voices


def _plan(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample formant tracks (4, n), voicing envelope (n,) and noise-burst envelope (n,) of one utterance."""
    formants = np.zeros((4, n))
    voiced, noise = np.zeros(n), np.zeros(n)
    names = list(VOWELS)
    pos = int(rng.uniform(0.08, 0.2) * RATE)  # leading silence
    prev = np.array(VOWELS[rng.choice(names)], float)
    formants[:, :pos] = prev[:, None]
    end = n - int(rng.uniform(0.08, 0.2) * RATE)  # trailing silence
    while pos < end:
        if rng.random() < 0.35:  # consonant: fricative (long, soft) or plosive (closure then burst)
            fricative = rng.random() < 0.5
            length = int((rng.uniform(0.04, 0.1) if fricative else rng.uniform(0.01, 0.025)) * RATE)
            gap = 0 if fricative else int(rng.uniform(0.02, 0.05) * RATE)
            stop = min(pos + gap + length, end)
            amp = rng.uniform(0.15, 0.35) if fricative else rng.uniform(0.4, 0.8)
            if stop > pos + gap:
                noise[pos + gap:stop] = np.hanning(stop - pos - gap) * amp
            formants[:, pos:stop] = prev[:, None]
            pos = stop
        length = min(int(rng.uniform(0.1, 0.3) * RATE), end - pos)
        if length <= 0:
            break
        target = np.array(VOWELS[rng.choice(names)], float)
        ramp = np.clip(np.arange(length) / max(1, int(0.4 * length)), 0, 1)  # 40% transition, then steady
        formants[:, pos:pos + length] = prev[:, None] + (target - prev)[:, None] * ramp
        voiced[pos:pos + length] = np.sin(np.pi * np.arange(length) / length) ** 0.3
        prev, pos = target, pos + length
        if rng.random() < 0.25 and pos < end:  # a pause between "words"
            pause = min(int(rng.uniform(0.05, 0.15) * RATE), end - pos)
            formants[:, pos:pos + pause] = prev[:, None]
            pos += pause
    formants[:, pos:] = prev[:, None]
    return formants, voiced, noise


def _glottal_source(rng: np.random.Generator, voice: Voice, n: int) -> np.ndarray:
    """Pulse train at the voice's pitch (jitter, vibrato, falling intonation), low-passed into glottal pulses."""
    t = np.arange(n) / RATE
    wander = np.convolve(rng.standard_normal(n // BLOCK + 2), np.ones(4) / 4, "same")
    jitter = np.repeat(wander, BLOCK)[:n] * voice.jitter * 3
    intonation = 1.1 - 0.2 * t / max(t[-1], 1e-9)  # falling from +10% to -10%
    vibrato = voice.vibrato_depth * np.sin(2 * np.pi * voice.vibrato_hz * t)
    f0 = voice.f0 * intonation * (1 + vibrato + jitter)
    phase = np.cumsum(f0) / RATE
    pulses = np.diff(np.floor(phase), prepend=0.0)  # 1 at the start of every period
    return lfilter([1.0], [1.0, -1.9, 0.9025], pulses)  # two poles at 0.95: -12 dB/octave glottal roll-off


def _formant_filter(x: np.ndarray, formants: np.ndarray) -> np.ndarray:
    """Cascade of 4 two-pole resonators, coefficients updated every BLOCK samples (filter state carried over)."""
    y = x.copy()
    for k in range(4):
        r = np.exp(-np.pi * BANDWIDTHS[k] / RATE)
        state = np.zeros(2)
        out = np.empty_like(y)
        for start in range(0, len(y), BLOCK):
            f = min(formants[k, start], RATE / 2 - 400)
            a = [1.0, -2 * r * np.cos(2 * np.pi * f / RATE), r * r]
            out[start:start + BLOCK], state = lfilter([sum(a)], a, y[start:start + BLOCK], zi=state)
        y = out
    return y


def synthesize(voice: Voice, seconds: float, seed: int) -> np.ndarray:
    """One utterance of `voice`: float32 (samples,) at 16 kHz, peak between 0.3 and 0.8."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    formants, voiced, noise_env = _plan(rng, n)
    formants = formants * voice.formant_scale
    source = _glottal_source(rng, voice, n)
    source = source / (np.abs(source).max() + 1e-9)
    excitation = voiced * (source + voice.breathiness * rng.standard_normal(n))
    speech = _formant_filter(excitation, formants)
    hiss = 0.2 * lfilter([1.0, -0.9], [1.0], rng.standard_normal(n)) * noise_env  # high-tilted consonant noise
    speech = speech / (np.abs(speech).max() + 1e-9) + hiss
    speech += 1e-4 * rng.standard_normal(n)  # room noise floor
    return (speech / np.abs(speech).max() * rng.uniform(0.3, 0.8)).astype(np.float32)


def make_demo_corpus(out_dir: str | Path, n_speakers: int = 4, n_utts: int = 12,
                     seconds: tuple[float, float] = (1.0, 2.5), seed: int = 0) -> list[Path]:
    """Write a `folder` corpus of synthetic speakers to `out_dir`; returns the wav paths (existing ones are rewritten).

    Args:
        out_dir: corpus root; files go to `<out_dir>/<speaker>/<speaker>_<nnn>.wav` (16 kHz, PCM 16 bit).
        n_speakers, n_utts: corpus size.
        seconds: (shortest, longest) utterance duration.
        seed: everything is deterministic given the seed.
    """
    out_dir = Path(out_dir)
    paths = []
    for s, voice in enumerate(make_voices(n_speakers, seed)):
        folder = out_dir / voice.name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, s])
        for u in range(n_utts):
            length = float(rng.uniform(*seconds))
            wav = synthesize(voice, length, seed=int(rng.integers(2**31)))
            path = folder / f"{voice.name}_{u + 1:03d}.wav"
            sf.write(path, wav, RATE, subtype="PCM_16")
            paths.append(path)
    return paths
