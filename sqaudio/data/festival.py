"""A phone-aligned English corpus made by Festival (Debian packages festival, festvox-kallpc16k,
festvox-kdlpc16k, festvox-us-slt-hts): speech together with the exact phone segment times the synthesiser used.
More speakers come from shifting each voice's pitch and speaking rate. `build_corpus` writes the ZeroSpeech 2019
layout (english/train/unit/, english/test/, files named <speaker>_<id>.wav at 16 kHz) and an ABX item file of the
test part (english/test.item, see docs/abx.md).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from sqaudio.data.audio import resample
from sqaudio.errors import UserError
from sqaudio.files import atomic_write

RATE = 16000
VOICE_DIR = Path("/usr/share/festival/voices")
# voice -> (Festival's command, its folder, its mean F0 target in Hz; None: an HTS voice, shifted in semitones)
VOICES = {"kal": ("voice_kal_diphone", "english/kal_diphone", 105.0),
          "ked": ("voice_ked_diphone", "english/ked_diphone", 105.0),
          "slt": ("voice_cmu_us_slt_arctic_hts", "us/cmu_us_slt_arctic_hts", None)}
SILENCE, SILENCE_CONTEXT = "pau", "SIL"
HEADER = "#file onset offset #phone prev-phone next-phone speaker"
# Harvard sentences (IEEE 1969 recommended practice for speech quality measurements)
SENTENCES = (
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
)
# (pitch shift in semitones, speaking rate) of the 1st, 2nd, ... speaker made from each voice
VARIANTS = ((0.0, 1.0), (4.0, 0.9), (-3.0, 1.15), (7.0, 1.05), (-5.0, 0.85))


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a Festival voice with its pitch shifted by `semitones` and spoken `rate` times as
    fast. `name` has no "_" (ZeroSpeech file names are <speaker>_<id>)."""

    name: str
    voice: str
    semitones: float = 0.0
    rate: float = 1.0

    @property
    def speed(self) -> float:
        """Playback speed-up applied after synthesis: how an HTS voice's pitch is shifted (Festival 2.5's HTS module
        has no pitch option), which also shortens the speech (the synthesis rate makes up for it)."""
        return 2 ** (self.semitones / 12) if VOICES[self.voice][2] is None else 1.0

    def scheme(self) -> str:
        """Festival commands selecting this speaker."""
        command, _, f0 = VOICES[self.voice]
        if f0 is None:
            return (f"({command})\n(set! hts_engine_params\n"
                    f'  (append hts_engine_params (list (list "-r" {self.rate / self.speed:.4f}))))\n')
        target = f0 * 2 ** (self.semitones / 12)
        return (f"({command})\n(set! int_lr_params (cons (list 'target_f0_mean {target:.2f}) int_lr_params))\n"
                f"(Parameter.set 'Duration_Stretch {1 / self.rate:.4f})\n")


@dataclass(frozen=True)
class Segment:
    """A phone of a synthesised utterance and its times in seconds."""

    phone: str
    start: float
    end: float


def make_speakers(n: int) -> list[Speaker]:
    """`n` speakers: every voice plainly, then every voice with the next pitch and rate variant, and so on."""
    if not 1 <= n <= len(VOICES) * len(VARIANTS):
        raise UserError(f"the Festival corpus has 1 to {len(VOICES) * len(VARIANTS)} speakers, not {n}")
    combos = [(voice, k) for k in range(len(VARIANTS)) for voice in VOICES][:n]
    return [Speaker(f"{voice.upper()}{k}", voice, *VARIANTS[k]) for voice, k in combos]


def unavailable() -> str | None:
    """Why Festival cannot make the corpus here (None when it can)."""
    if shutil.which("festival") is None:
        return "festival is not installed (apt-get install festival)"
    missing = [name for name, (_, folder, _) in VOICES.items() if not (VOICE_DIR / folder).is_dir()]
    return f"Festival voices missing: {', '.join(missing)}" if missing else None


def synthesize(speaker: Speaker, texts: list[str], timeout: float = 600.0) -> list[tuple[np.ndarray, list[Segment]]]:
    """Each text spoken by `speaker`: (16 kHz float32 waveform, its phone segments), from one Festival process."""
    with tempfile.TemporaryDirectory() as tmp:
        lines = ['(define (dump utt wav segs)\n  (utt.save.wave utt wav (quote riff))\n  (set! fd (fopen segs "w"))\n'
                 '  (mapcar (lambda (s) (format fd "%s %f\\n" (item.name s) (item.feat s "end")))\n'
                 '          (utt.relation.items utt (quote Segment)))\n  (fclose fd))\n', speaker.scheme()]
        for i, text in enumerate(texts):
            quoted = text.replace("\\", " ").replace('"', " ")
            lines.append(f'(dump (utt.synth (Utterance Text "{quoted}")) "{i}.wav" "{i}.segs")\n')
        (Path(tmp) / "run.scm").write_text("".join(lines))
        done = subprocess.run(["festival", "--batch", "run.scm"], cwd=tmp, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0 or not (Path(tmp) / f"{len(texts) - 1}.segs").is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"festival failed for speaker {speaker.name}: {tail[0]}")
        return [_read(Path(tmp) / f"{i}.wav", Path(tmp) / f"{i}.segs", speaker.speed) for i in range(len(texts))]


def _read(wav_path: Path, segs_path: Path, speed: float) -> tuple[np.ndarray, list[Segment]]:
    """A synthesised waveform played `speed` times as fast (its rate times speed, rounded to 100 Hz), at 16 kHz,
    and its segments (each starting where the one before ends), their times scaled alike."""
    wav, rate = sf.read(wav_path, dtype="float32")
    played = int(round(rate * speed / 100)) * 100
    wav = resample(torch.from_numpy(wav), played, RATE).numpy()
    segments, start = [], 0.0
    for line in segs_path.read_text().splitlines():
        phone, end = line.split()
        segments.append(Segment(phone, start, float(end) * rate / played))
        start = segments[-1].end
    return wav, segments


def item_lines(file_id: str, speaker: str, segments: list[Segment]) -> list[str]:
    """Item-file lines of an utterance: every phone but silence that has a phone (or silence, as SIL) on both
    sides, with its times."""
    def context(seg: Segment) -> str:
        return SILENCE_CONTEXT if seg.phone == SILENCE else seg.phone

    return [f"{file_id} {seg.start:.4f} {seg.end:.4f} {seg.phone} {context(prev)} {context(nxt)} {speaker}"
            for prev, seg, nxt in zip(segments, segments[1:], segments[2:])
            if seg.phone != SILENCE and seg.end > seg.start]


def build_corpus(out: Path, speakers: list[Speaker], sentences: list[str], test_sentences: int) -> dict:
    """Write the corpus under `out`: every speaker says every sentence; the last `test_sentences` sentences go
    to english/test/ (with english/test.item), the others to english/train/unit/. Returns its counts."""
    if not 0 < test_sentences < len(sentences):
        raise UserError(f"test sentences must be 1 to {len(sentences) - 1}, not {test_sentences}")
    lang, lines, seconds = Path(out) / "english", [HEADER], 0.0
    for speaker in speakers:
        for i, (wav, segments) in enumerate(synthesize(speaker, sentences)):
            test = i >= len(sentences) - test_sentences
            file_id = f"{speaker.name}_{i:04d}"
            target = lang / ("test" if test else "train/unit") / f"{file_id}.wav"
            atomic_write(target, lambda tmp: sf.write(tmp, wav, RATE, subtype="PCM_16", format="WAV"))
            lines += item_lines(file_id, speaker.name, segments) if test else []
            seconds += len(wav) / RATE
    atomic_write(lang / "test.item", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    test_files = len(speakers) * test_sentences
    return {"speakers": [s.name for s in speakers], "train_files": len(speakers) * len(sentences) - test_files,
            "test_files": test_files, "items": len(lines) - 1, "seconds": seconds}
