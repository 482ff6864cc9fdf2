"""Audio files -> discrete codes -> log-mel -> waveform, with a trained speech SQ-VAE and a vocoder."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import torch

from sqaudio.codec.chunking import Rolling, overlap_apply, overlap_stream, spans
from sqaudio.config import FeatureConfig, from_dict
from sqaudio.data.features import LogMel, MelStream, mel_mse_db2
from sqaudio.distributed import pick_device
from sqaudio.errors import UserError
from sqaudio.models.speech import encoder_lengths
from sqaudio.models.sqvae import load_model

if TYPE_CHECKING:
    from sqaudio.codec.vocoders import Vocoder

CHUNK_SECONDS = 10.0      # long inputs are processed in windows of this much audio (bounded memory)
ENCODER_CONTEXT = 16      # latents per side: covers the encoder's receptive field (codes are exact)
DECODER_CONTEXT = 100     # latents per side (2 s) for the bi-GRU decoder; crossfaded over DECODER_FADE
DECODER_FADE = 50
VOCODER_CONTEXT = 32      # mel frames per side for the vocoder; crossfaded over VOCODER_FADE
VOCODER_FADE = 16
SPOOL_BLOCK = 1 << 18     # samples per read when a whole-signal vocoder finish reads its spool back


@dataclass
class Encoded:
    """Codes of one file and what is needed to decode them."""

    codes: np.ndarray        # (T',) int64
    speaker: str
    samples: int             # input length at the feature sample rate
    mel: np.ndarray | None = None  # (n_mels, frames) input features (even frame count), when asked to keep them
    speaker_from: str = ""   # how the speaker was chosen: --speaker, file name, folder name, or fallback


class Codec:
    """A speech SQ-VAE checkpoint plus a vocoder.

    Args:
        model: run directory or checkpoint of a speech SQ-VAE.
        vocoder: "griffin-lim", a vocoder directory/checkpoint, a pretrained parallel-wavegan directory, or an
            already-loaded `Vocoder` (shared by several codecs; None: no vocoder).
        device: auto, cpu, cuda ...
        chunk_seconds: window length for long inputs (memory is bounded by it, not by the input's length).
    """

    def __init__(self, model: str | Path, vocoder: str | Path | Vocoder | None = "griffin-lim",
                 device: str | None = None, chunk_seconds: float = CHUNK_SECONDS):
        from sqaudio.codec.vocoders import Vocoder, load_vocoder

        self.device = pick_device(device)
        self.model, state = load_model(model, self.device)
        if self.model.recipe.data.kind != "speech":
            raise UserError(f"{model} is an image model; reconstruct/encode/decode need a speech model")
        self.features: FeatureConfig = from_dict(FeatureConfig, state["features"], "features")
        self.speakers: list[str] = state["speakers"]
        self.model_id = fingerprint(self.model)
        self.vocoder = (vocoder if vocoder is None or isinstance(vocoder, Vocoder)
                        else load_vocoder(str(vocoder), device=self.device))
        if self.vocoder is not None:
            self.vocoder.check_compatible(self.features)
        self.logmel = LogMel(self.features, method="frames").to(self.device)  # chunked |STFT| on any device
        self.chunk_latents = max(int(chunk_seconds * self.features.frame_rate / 2), 2 * DECODER_FADE)

    def speaker_index(self, speaker: str) -> int:
        """Row of a training speaker in the speaker table (a UserError lists the known ones)."""
        if speaker not in self.speakers:
            raise UserError(f"unknown speaker '{speaker}' (known: {', '.join(self.speakers)})")
        return self.speakers.index(speaker)

    def speaker_for(self, path: Path, speaker: str | None) -> tuple[str, str]:
        """(speaker, how it was chosen): --speaker, else the training speaker named by the file (prefix or folder),
        else the first training speaker ("fallback": the caller should say so)."""
        if speaker is not None:
            self.speaker_index(speaker)
            return speaker, "--speaker"
        prefix = re.split(r"[_\-]", path.stem)[0]
        for guess, how in ((prefix, "file name"), (path.parent.name, "folder name")):
            if guess in self.speakers:
                return guess, how
        return self.speakers[0], "fallback"

    def windows(self, samples: int, encode: bool = True) -> int:
        """How many model windows `reconstruct` (or, without `encode`, `decode`) runs for `samples` samples."""
        frames = samples // self.features.hop_length + 1
        latents = max(frames // 2 - 1, 1)
        full = max(frames, 2 * latents + 1)
        coded = len(spans(latents, self.chunk_latents, 0))
        return (1 + encode) * coded + len(spans(full, 2 * self.chunk_latents, 0))

    # Every path below is streamed: the input's log-mel comes from `MelStream` (two passes over the file), each
    # stage reads forward-moving windows of the previous one (`Rolling`) and yields its output as soon as it is
    # final (`overlap_stream`), and the waveform goes to the output file block by block. What is held whatever
    # the length: the codes (8 bytes per 20 ms latent) and one window per stage. The in-memory methods
    # (`reconstruct`, `decode`, `decode_mel`, `synthesize`) run the same generators and collect their output.

    @torch.no_grad()
    def encode(self, path: Path, speaker: str | None = None, step: Callable[[], None] | None = None,
               keep_mel: bool = False) -> Encoded:
        """Codes of an audio file (with `keep_mel`, also its whole log-mel, e.g. for a plot)."""
        return self._encode(path, speaker, step, keep_mel)[0]

    @torch.no_grad()
    def _encode(self, path: Path, speaker: str | None, step, keep_mel: bool) -> tuple[Encoded, MelStream]:
        name, how = self.speaker_for(Path(path), speaker)
        stream = MelStream(path, self.features, self.logmel)  # pass 1: validates the file
        frames = stream.frames - stream.frames % 2  # T even
        latents = int(encoder_lengths(torch.tensor(frames)).item())
        if latents < 1:
            raise UserError(f"{path}: too short for one latent frame")
        kept: list[torch.Tensor] = []
        chunks = (kept.append(c) or c for c in stream.chunks()) if keep_mel else stream.chunks()
        mel = Rolling(c[None] for c in chunks)  # (1, n_mels, f) windows
        codes = overlap_apply(lambda s, e: self.model.encode({"mel": mel.read(2 * s, 2 * e + 2)})[0], latents,
                              self.chunk_latents, ENCODER_CONTEXT, on_window=step)  # (1, T') exact
        whole = torch.cat(kept, dim=-1)[:, :frames].cpu().numpy() if keep_mel else None
        return Encoded(codes[0].cpu().numpy().astype(np.int64), name, stream.samples, whole, how), stream

    def _decoded(self, codes: np.ndarray, speaker: str, step) -> Iterator[torch.Tensor]:
        """Decoder log-mel pieces (1, n_mels, f_i) of the input's frames 1..2T', in order (checks eagerly)."""
        if codes.ndim != 1 or codes.size == 0 or codes.min() < 0 or codes.max() >= self.model.recipe.quantizer.codebook_size:
            raise UserError("codes do not fit this model's codebook")
        spk = torch.tensor([self.speaker_index(speaker)], device=self.device)

        def window(s: int, e: int) -> torch.Tensor:
            z_q = self.model.quantizer.lookup(torch.from_numpy(codes[s:e])[None].to(self.device))  # (1, D, e - s)
            return self.model.decode(z_q, spk)

        return _no_grad(overlap_stream(window, codes.size, self.chunk_latents, DECODER_CONTEXT, scale=2,
                                       fade=DECODER_FADE, on_window=step))

    def _vocoded(self, mel: Iterable[torch.Tensor], mel_frames: int, samples: int, step) -> Iterator[torch.Tensor]:
        """Vocoder output pieces (1, n) before `finish`, of (frames) * hop samples: the decoder's mel with the edge
        frames restored (frame 0 repeated from frame 1, the last one repeated to the input's frame count)."""
        if self.vocoder is None:
            raise UserError("no vocoder given")
        frames = samples // self.features.hop_length + 1
        pad_right = max(frames - mel_frames - 1, 0)

        def full_mel() -> Iterator[torch.Tensor]:
            last = None
            for piece in mel:
                if last is None:
                    yield piece[:, :, :1]
                yield piece
                last = piece[:, :, -1:]
            if pad_right:
                yield last.expand(-1, -1, pad_right)

        full = Rolling(full_mel())
        return _no_grad(overlap_stream(lambda s, e: self.vocoder.generate(full.read(s, e)).float(),
                                       1 + mel_frames + pad_right, 2 * self.chunk_latents, VOCODER_CONTEXT,
                                       scale=self.features.hop_length, fade=VOCODER_FADE, on_window=step))

    def _finished(self, wav: Iterable[torch.Tensor], samples: int, spool: Path | None = None) -> Iterator[np.ndarray]:
        """Vocoder pieces -> float32 output blocks of exactly `samples` samples in all, after the vocoder's `finish`.

        A whole-signal finish (Griffin-Lim's peak scaling) needs the peak before the first block can go out: the
        raw pieces are spooled to the float32 file `spool` (or held, without one) and read back in blocks."""
        def exact(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            left = samples
            for block in blocks:
                if left > 0:
                    yield block[:left]
                left -= len(block)
            if left > 0:
                yield np.zeros(left, np.float32)

        if not self.vocoder.whole_signal_finish:
            yield from exact(self.vocoder.finish(w)[0].cpu().numpy() for w in wav)
            return
        peak, held = None, []
        with (open(spool, "w+b") if spool is not None else nullcontext()) as f:
            for w in wav:
                m = w.abs().amax(dim=-1, keepdim=True)
                peak = m if peak is None else torch.maximum(peak, m)
                if f is None:
                    held.append(w)
                else:
                    f.write(w[0].cpu().numpy().astype(np.float32).tobytes())
            if f is not None:
                f.seek(0)
                held = (torch.from_numpy(np.frombuffer(f.read(SPOOL_BLOCK * 4), np.float32).copy())[None].to(peak)
                        for _ in itertools.count())
                held = itertools.takewhile(lambda w: w.numel() > 0, held)
            yield from exact(self.vocoder.finish_with(w, peak)[0].cpu().numpy() for w in held)

    def decode_mel(self, codes: np.ndarray, speaker: str, step: Callable[[], None] | None = None) -> torch.Tensor:
        """Codes (T',) -> decoder log-mel (1, n_mels, 2 T') (the input's frames 1..2T')."""
        return torch.cat(list(self._decoded(codes, speaker, step)), dim=-1)

    def synthesize(self, mel: torch.Tensor, samples: int, step: Callable[[], None] | None = None) -> np.ndarray:
        """Decoder log-mel (1, n_mels, F) -> waveform of exactly `samples` samples (edge frames restored)."""
        return np.concatenate(list(self._finished(self._vocoded([mel], mel.shape[-1], samples, step), samples)))

    def decode(self, codes: np.ndarray, speaker: str, samples: int,
               step: Callable[[], None] | None = None) -> np.ndarray:
        """Codes (T',) -> waveform of `samples` samples, window by window (see `windows`)."""
        return self.synthesize(self.decode_mel(codes, speaker, step), samples, step)

    def decode_to(self, codes: np.ndarray, speaker: str, samples: int, target: Path,
                  step: Callable[[], None] | None = None) -> None:
        """`decode` written to the 16-bit wav `target` block by block (atomically), in flat memory."""
        self._write(target, self._vocoded(self._decoded(codes, speaker, step), 2 * codes.size, samples, step), samples)

    def reconstruct(self, path: Path, speaker: str | None = None, step: Callable[[], None] | None = None
                    ) -> tuple[np.ndarray, dict[str, Any], Encoded, torch.Tensor]:
        """Waveform, statistics (codes used, bitrate, the file's mel-MSE in dB^2), the codes (with the input's
        log-mel) and the decoded log-mel (1, n_mels, frames). `step` is called after each model window (see
        `windows`). Holds whole signals: `reconstruct_to` is the flat-memory path."""
        enc, stream = self._encode(path, speaker, step, keep_mel=True)
        mel_hat = torch.cat(list(self._scored(enc, stream, step, [], stats := {})), dim=-1)
        return self.synthesize(mel_hat, enc.samples, step), stats, enc, mel_hat

    def reconstruct_to(self, path: Path, target: Path, speaker: str | None = None,
                       step: Callable[[], None] | None = None, keep_mels: bool = False
                       ) -> tuple[dict[str, Any], Encoded, torch.Tensor | None]:
        """`reconstruct` written to the 16-bit wav `target` block by block (atomically), in flat memory: returns
        the statistics, the codes and (with `keep_mels`, e.g. for a plot: these grow with the input) the input's
        and the decoded log-mel, else None."""
        enc, stream = self._encode(path, speaker, step, keep_mel=keep_mels)
        kept: list[torch.Tensor] = []
        decoded = self._scored(enc, stream, step, kept if keep_mels else None, stats := {})
        self._write(target, self._vocoded(decoded, 2 * enc.codes.size, enc.samples, step), enc.samples)
        return stats, enc, torch.cat(kept, dim=-1) if keep_mels else None

    def _scored(self, enc: Encoded, stream: MelStream, step, kept: list | None, stats: dict[str, Any]
                ) -> Iterator[torch.Tensor]:
        """Decoder pieces of `enc`, filling `stats` as they pass (the mel-MSE against the input's frames 1..2T',
        read again from `stream`, in the end) and appending them to `kept` (if given)."""
        pieces = self._decoded(enc.codes, enc.speaker, step)
        target = Rolling(c[None] for c in stream.chunks())  # pass 2 again: the input's log-mel, for the MSE
        stats.update({"codes_used": int(np.unique(enc.codes).size), "latent_frames": int(enc.codes.size),
                      "bitrate_bps": float(np.log2(self.model.recipe.quantizer.codebook_size)
                                           * self.features.frame_rate / 2),
                      "speaker": enc.speaker})
        done, sse = 0, 0.0
        for piece in pieces:
            f = piece.shape[-1]
            sse += ((piece[0].cpu() - target.read(1 + done, 1 + done + f)[0].cpu()) ** 2).sum().item()
            done += f
            if kept is not None:
                kept.append(piece)
            yield piece
        stats["mel_mse_db2"] = mel_mse_db2(sse, self.features.n_mels, done, self.features.top_db)

    def _write(self, target: Path, wav: Iterable[torch.Tensor], samples: int) -> None:
        """Vocoder pieces -> `target` (16-bit PCM wav, atomic; a whole-signal finish spools next to it)."""
        from sqaudio.files import atomic_write

        def write(tmp: Path) -> None:
            spool = tmp.with_name(tmp.name + ".f32")
            try:
                _write_blocks(tmp, self._finished(wav, samples, spool), self.features.sample_rate)
            finally:
                spool.unlink(missing_ok=True)

        atomic_write(Path(target), write)

    def header(self, enc: Encoded) -> dict[str, Any]:
        return {"model_id": self.model_id, "sample_rate": self.features.sample_rate,
                "frame_rate": self.features.frame_rate / 2, "codebook_size": self.model.recipe.quantizer.codebook_size,
                "speaker": enc.speaker, "samples": enc.samples, "latent_frames": int(enc.codes.size)}

    def check_header(self, header: dict[str, Any], path: Path) -> None:
        if header.get("model_id") != self.model_id:
            raise UserError(f"{path} holds codes from another model (model id {header.get('model_id')}, "
                            f"this model is {self.model_id})")


def fingerprint(model: torch.nn.Module) -> str:
    """Short id of a trained model: a hash of its codebook (codes are only meaningful with it)."""
    book = model.quantizer.lookup(torch.arange(model.recipe.quantizer.codebook_size)[None].to(
        next(model.parameters()).device))
    return hashlib.sha1(book.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]


def write_wav(path: Path, wav: np.ndarray, rate: int) -> None:
    """Write a 16-bit PCM wav atomically."""
    from sqaudio.files import atomic_write

    atomic_write(path, lambda tmp: _write_blocks(tmp, [wav], rate))


def _write_blocks(path: Path, blocks: Iterable[np.ndarray], rate: int) -> None:
    """Float blocks -> one 16-bit PCM mono wav at `path` (clipped to [-1, 1]), written block by block."""
    import soundfile as sf

    with sf.SoundFile(str(path), "w", rate, 1, subtype="PCM_16", format="WAV") as f:
        for block in blocks:
            f.write(np.clip(block, -1, 1))


def _no_grad(pieces: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """A generator's steps run under torch.no_grad (a decorator on the generator function would not cover them)."""
    while True:
        with torch.no_grad():
            piece = next(pieces, None)
        if piece is None:
            return
        yield piece


def code_files(path: Path, fmt: str) -> list[Path]:
    """The files `write_codes` writes for codes at `path` (<name>.npy): npy + json header, or zerospeech .txt."""
    if fmt == "zerospeech":
        return [path.with_suffix(".txt")]
    if fmt != "npy":
        raise UserError(f"unknown codes format '{fmt}' (valid: npy, zerospeech)")
    return [path.with_suffix(".npy"), path.with_suffix(".json")]


def write_codes(path: Path, codec: Codec, enc: Encoded, fmt: str) -> list[Path]:
    """`npy`: <path>.npy + <path>.json header; `zerospeech`: <path>.txt, one codebook vector per latent frame."""
    from sqaudio.files import atomic_write

    files = code_files(path, fmt)
    if fmt == "zerospeech":
        vectors = codec.model.quantizer.lookup(torch.from_numpy(enc.codes)[None].to(codec.device))[0].T.detach().cpu().numpy()
        atomic_write(files[0], lambda tmp: np.savetxt(tmp, vectors, fmt="%.6f"))
        return files
    atomic_write(files[0], lambda tmp: np.save(open(tmp, "wb"), enc.codes))
    atomic_write(files[1], lambda tmp: tmp.write_text(json.dumps(codec.header(enc), indent=2)))
    return files


def read_codes(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    header_path = path.with_suffix(".json")
    try:
        codes = np.load(path)
        header = json.loads(header_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read codes {path} with header {header_path.name}: {err}") from None
    return codes.astype(np.int64), header
