"""Audio files -> discrete codes -> log-mel -> waveform, with a trained speech SQ-VAE and a vocoder."""
from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import torch

from sqaudio.codec.chunking import Rolling, overlap_stream, spans
from sqaudio.codec.codes import fingerprint
from sqaudio.codec.waveform import finished, write_vocoded
from sqaudio.config import FeatureConfig, from_dict
from sqaudio.data.features import LogMel, mel_mse_db2
from sqaudio.data.stream import MelStream
from sqaudio.errors import UserError
from sqaudio.models.speech import encoder_lengths

if TYPE_CHECKING:
    from sqaudio.codec.vocoders import Vocoder
    from sqaudio.models.sqvae import SQVAE

CHUNK_SECONDS = 10.0      # long inputs are processed in windows of this much audio (bounded memory)
ENCODER_CONTEXT = 16      # latents per side: covers the encoder's receptive field (codes are exact)
DECODER_CONTEXT = 100     # latents per side (2 s) for the bi-GRU decoder; crossfaded over DECODER_FADE
DECODER_FADE = 50
VOCODER_CONTEXT = 32      # mel frames per side for the vocoder; crossfaded over VOCODER_FADE
VOCODER_FADE = 16

Step = Callable[[], None]  # called after each model window (a progress bar)


class SpeakerSource(enum.Enum):
    """How the speaker of an input was chosen."""

    GIVEN = "--speaker"
    FILE_NAME = "file name"
    FOLDER_NAME = "folder name"
    FALLBACK = "fallback"  # none named: the first training speaker (the caller should say so)


@dataclass
class Encoded:
    """Codes of one file and what is needed to decode them."""

    codes: np.ndarray        # (T',) int64
    speaker: str
    samples: int             # input length at the feature sample rate
    mel: np.ndarray | None = None  # (n_mels, frames) input features (even frame count), when asked to keep them
    speaker_from: SpeakerSource = SpeakerSource.GIVEN

    @property
    def speaker_fallback(self) -> bool:
        return self.speaker_from is SpeakerSource.FALLBACK


@dataclass
class Reconstruction:
    """One input through the codec: its codes and how well the decoder's log-mel matches the input's."""

    encoded: Encoded
    codes_used: int
    bitrate_bps: float
    mel_mse_db2: float       # decoder log-mel against the input's frames 1..2T'
    mel_hat: torch.Tensor | None = None  # (1, n_mels, 2T') decoder log-mel, when kept
    wav: np.ndarray | None = None        # (samples,) the waveform, from the in-memory `reconstruct`

    @property
    def latent_frames(self) -> int:
        return int(self.encoded.codes.size)


class Codec:
    """A speech SQ-VAE plus a vocoder.

    Args:
        model: a loaded speech SQ-VAE (`sqaudio.models.sqvae.load_model`), on the device to run on.
        state: its checkpoint state (feature config and speaker table).
        vocoder: a loaded `Vocoder` (shared by several codecs), or None for encoding only.
        chunk_seconds: window length for long inputs (memory is bounded by it, not by the input's length).
    """

    def __init__(self, model: SQVAE, state: dict[str, Any], vocoder: Vocoder | None = None,
                 chunk_seconds: float = CHUNK_SECONDS):
        if model.recipe.data.kind != "speech":
            raise UserError(f"{model.recipe.name} is an image model; reconstruct/encode/decode need a speech model")
        self.model = model
        self.device = next(model.parameters()).device
        self.features: FeatureConfig = from_dict(FeatureConfig, state["features"], "features")
        self.speakers: list[str] = state["speakers"]
        self.model_id = fingerprint(model)
        self.vocoder = vocoder
        if vocoder is not None:
            vocoder.check_compatible(self.features)
        self.logmel = LogMel(self.features, method="frames").to(self.device)  # chunked |STFT| on any device
        self.chunk_latents = max(int(chunk_seconds * self.features.frame_rate / 2), 2 * DECODER_FADE)

    @classmethod
    def load(cls, model: str | Path, vocoder: str | None = "griffin-lim", device: str | None = None) -> Codec:
        """A codec from a run directory or checkpoint and a vocoder name or path, each read once."""
        from sqaudio.codec.vocoders import load_vocoder
        from sqaudio.distributed import pick_device
        from sqaudio.models.sqvae import load_model

        dev = pick_device(device)
        loaded, state = load_model(model, dev)
        return cls(loaded, state, load_vocoder(vocoder, dev) if vocoder is not None else None)

    def speaker_index(self, speaker: str) -> int:
        """Row of a training speaker in the speaker table (a UserError lists the known ones)."""
        if speaker not in self.speakers:
            raise UserError(f"unknown speaker '{speaker}' (known: {', '.join(self.speakers)})")
        return self.speakers.index(speaker)

    def speaker_for(self, path: Path, speaker: str | None) -> tuple[str, SpeakerSource]:
        """(speaker, how it was chosen): --speaker, else the training speaker named by the file (prefix or folder),
        else the first training speaker."""
        if speaker is not None:
            self.speaker_index(speaker)
            return speaker, SpeakerSource.GIVEN
        prefix = re.split(r"[_\-]", path.stem)[0]
        for guess, how in ((prefix, SpeakerSource.FILE_NAME), (path.parent.name, SpeakerSource.FOLDER_NAME)):
            if guess in self.speakers:
                return guess, how
        return self.speakers[0], SpeakerSource.FALLBACK

    def windows(self, samples: int, encode: bool = True) -> int:
        """How many model windows `reconstruct` (or, without `encode`, `decode`) runs for `samples` samples."""
        frames = samples // self.features.hop_length + 1
        latents = max(frames // 2 - 1, 1)
        full = max(frames, 2 * latents + 1)
        coded = len(spans(latents, self.chunk_latents, 0))
        return (1 + encode) * coded + len(spans(full, 2 * self.chunk_latents, 0))

    # Every path below is streamed: the input's log-mel comes from `MelStream` (two passes over the file, see
    # `_Input`), each stage reads forward-moving windows of the previous one (`Rolling`) and yields its output as
    # soon as it is final (`overlap_stream`): the encoder's codes feed the decoder, the decoder's mel the vocoder,
    # and the waveform goes to the output file block by block. What is held whatever the length: the codes
    # (8 bytes per 20 ms latent) and one window per stage. The in-memory methods (`reconstruct`, `decode`,
    # `decode_mel`, `synthesize`) run the same generators and collect their output.

    def encode(self, path: Path, speaker: str | None = None, step: Step | None = None,
               keep_mel: bool = False) -> Encoded:
        """Codes of an audio file (with `keep_mel`, also its whole log-mel, e.g. for a plot)."""
        return _Input(self, path, speaker, step, keep_mel, score=False).encoded()

    def reconstruct(self, path: Path, speaker: str | None = None, step: Step | None = None) -> Reconstruction:
        """The waveform, codes (with the input's log-mel), decoded log-mel (1, n_mels, frames) and scores of a file,
        in memory. `step` is called after each model window (see `windows`). `reconstruct_to` is the flat-memory
        path."""
        source = _Input(self, path, speaker, step, keep_mel=True, score=True)
        mel_hat = torch.cat(list(source.scored()), dim=-1)
        return source.result(mel_hat, self.synthesize(mel_hat, source.samples, step))

    def reconstruct_to(self, path: Path, target: Path, speaker: str | None = None, step: Step | None = None,
                       keep_mels: bool = False) -> Reconstruction:
        """`reconstruct` written to the 16-bit wav `target` block by block (atomically), in flat memory; with
        `keep_mels` (e.g. for a plot: these grow with the input) the input's and the decoded log-mel are kept."""
        source = _Input(self, path, speaker, step, keep_mel=keep_mels, score=True)
        kept: list[torch.Tensor] = []
        decoded = source.scored() if not keep_mels else (kept.append(p) or p for p in source.scored())
        self._write(target, self._vocoded(decoded, 2 * source.latents, source.samples, step), source.samples)
        return source.result(torch.cat(kept, dim=-1) if keep_mels else None)

    def decode_mel(self, codes: np.ndarray, speaker: str, step: Step | None = None) -> torch.Tensor:
        """Codes (T',) -> decoder log-mel (1, n_mels, 2 T') (the input's frames 1..2T')."""
        return torch.cat(list(self._decoded(self._checked(codes), codes.size, speaker, step)), dim=-1)

    def synthesize(self, mel: torch.Tensor, samples: int, step: Step | None = None) -> np.ndarray:
        """Decoder log-mel (1, n_mels, F) -> waveform of exactly `samples` samples (edge frames restored)."""
        wav = self._vocoded([mel], mel.shape[-1], samples, step)
        return np.concatenate(list(finished(self.vocoder, wav, samples)))

    def decode(self, codes: np.ndarray, speaker: str, samples: int, step: Step | None = None) -> np.ndarray:
        """Codes (T',) -> waveform of `samples` samples, window by window (see `windows`)."""
        return self.synthesize(self.decode_mel(codes, speaker, step), samples, step)

    def decode_to(self, codes: np.ndarray, speaker: str, samples: int, target: Path, step: Step | None = None) -> None:
        """`decode` written to the 16-bit wav `target` block by block (atomically), in flat memory."""
        decoded = self._decoded(self._checked(codes), codes.size, speaker, step)
        self._write(target, self._vocoded(decoded, 2 * codes.size, samples, step), samples)

    def _checked(self, codes: np.ndarray) -> Callable[[int, int], torch.Tensor]:
        """Reader of codes[s:e] as (1, e - s) on the device; a UserError now if they do not fit the codebook."""
        if codes.ndim != 1 or codes.size == 0 or codes.min() < 0 or codes.max() >= self.model.recipe.quantizer.codebook_size:
            raise UserError("codes do not fit this model's codebook")
        return lambda s, e: torch.from_numpy(codes[s:e])[None].to(self.device)

    def _decoded(self, codes: Callable[[int, int], torch.Tensor], length: int, speaker: str, step
                 ) -> Iterator[torch.Tensor]:
        """Decoder log-mel pieces (1, n_mels, f_i) of the input's frames 1..2T', in order, from the code reader
        `codes(s, e)` -> (1, e - s) over `length` latents."""
        spk = torch.tensor([self.speaker_index(speaker)], device=self.device)

        def window(s: int, e: int) -> torch.Tensor:
            z_q = self.model.quantizer.lookup(codes(s, e))  # (1, D, e - s)
            return self.model.decode(z_q, spk)

        return _no_grad(overlap_stream(window, length, self.chunk_latents, DECODER_CONTEXT, scale=2,
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

    def _write(self, target: Path, wav: Iterable[torch.Tensor], samples: int) -> None:
        write_vocoded(target, self.vocoder, wav, samples, self.features.sample_rate)

    def header(self, enc: Encoded) -> dict[str, Any]:
        """The JSON header of a code file: what decoding it needs, and which model made it."""
        return {"model_id": self.model_id, "sample_rate": self.features.sample_rate,
                "frame_rate": self.features.frame_rate / 2, "codebook_size": self.model.recipe.quantizer.codebook_size,
                "speaker": enc.speaker, "samples": enc.samples, "latent_frames": int(enc.codes.size)}

    def check_header(self, header: dict[str, Any], path: Path) -> None:
        if header.get("model_id") != self.model_id:
            raise UserError(f"{path} holds codes from another model (model id {header.get('model_id')}, "
                            f"this model is {self.model_id})")


class _Input:
    """One audio file on its way through a codec, read twice, both times by `MelStream`.

    Pass 1 (here) validates the file and finds its length and peak. Pass 2 runs lazily as the encoder asks for
    log-mel windows; its codes feed the decoder as they come. With `score`, pass 2 also feeds the mel-MSE's
    target through `itertools.tee`, which holds only the chunks between the encoder and the decoder (about a
    window), so the file is not read a third time.
    """

    def __init__(self, codec: Codec, path: Path, speaker: str | None, step: Step | None, keep_mel: bool,
                 score: bool):
        self.codec, self.path, self.step = codec, Path(path), step
        self.speaker, self.speaker_from = codec.speaker_for(self.path, speaker)
        stream = MelStream(self.path, codec.features, codec.logmel)  # pass 1 over the file
        self.samples = stream.samples
        self.frames = stream.frames - stream.frames % 2  # T even
        self.latents = encoder_lengths(self.frames)
        if self.latents < 1:
            raise UserError(f"{path}: too short for one latent frame")
        chunks = stream.chunks()  # pass 2 over the file (lazy), the last one
        self._target = None
        if score:
            chunks, target = itertools.tee(chunks)
            self._target = Rolling(c[None] for c in target)  # (1, n_mels, f) windows
        self._kept_mel: list[torch.Tensor] | None = [] if keep_mel else None
        if keep_mel:
            chunks = (self._kept_mel.append(c) or c for c in chunks)
        self._mel = Rolling(c[None] for c in chunks)
        self._codes: list[np.ndarray] = []
        self._code_pieces = self._encoded_pieces()

    def _encoded_pieces(self) -> Iterator[torch.Tensor]:
        """Codes (1, n_i) in order as the encoder's windows make them (exact: windows cover its receptive field)."""
        model, mel = self.codec.model, self._mel
        pieces = overlap_stream(lambda s, e: model.encode({"mel": mel.read(2 * s, 2 * e + 2)})[0], self.latents,
                                self.codec.chunk_latents, ENCODER_CONTEXT, on_window=self.step)
        for piece in _no_grad(pieces):
            self._codes.append(piece[0].cpu().numpy())
            yield piece

    def encoded(self) -> Encoded:
        """The file's codes (the encoder runs over what is left of it)."""
        for _ in self._code_pieces:
            pass
        mel = (torch.cat(self._kept_mel, dim=-1)[:, :self.frames].cpu().numpy()
               if self._kept_mel is not None else None)
        codes = np.concatenate(self._codes).astype(np.int64)
        return Encoded(codes, self.speaker, self.samples, mel, self.speaker_from)

    def scored(self) -> Iterator[torch.Tensor]:
        """Decoder pieces (1, n_mels, f_i) of the codes as they come, summing the squared error against the input's
        frames 1..2T' as they pass (`result` reads it)."""
        codes = Rolling(self._code_pieces)
        done, self._sse = 0, 0.0
        for piece in self.codec._decoded(codes.read, self.latents, self.speaker, self.step):
            f = piece.shape[-1]
            target = self._target.read(1 + done, 1 + done + f)
            self._sse += ((piece[0].cpu() - target[0].cpu()) ** 2).sum().item()
            done += f
            yield piece
        self._scored_frames = done

    def result(self, mel_hat: torch.Tensor | None = None, wav: np.ndarray | None = None) -> Reconstruction:
        """The reconstruction's codes and scores, once `scored` has been read to its end."""
        enc, features = self.encoded(), self.codec.features
        bitrate = float(np.log2(self.codec.model.recipe.quantizer.codebook_size) * features.frame_rate / 2)
        mse = mel_mse_db2(self._sse, features.n_mels, self._scored_frames, features.top_db)
        return Reconstruction(enc, int(np.unique(enc.codes).size), bitrate, mse, mel_hat, wav)


def _no_grad(pieces: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """A generator's steps run under torch.no_grad (a decorator on the generator function would not cover them)."""
    while True:
        with torch.no_grad():
            piece = next(pieces, None)
        if piece is None:
            return
        yield piece
