"""Audio files -> discrete codes -> log-mel -> waveform, with a trained speech SQ-VAE and a vocoder."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sqaudio.chunking import overlap_apply, spans
from sqaudio.config import FeatureConfig, from_dict
from sqaudio.errors import UserError
from sqaudio.evaluate import mel_mse_db2
from sqaudio.features import LogMel, load_audio
from sqaudio.models.speech import encoder_lengths
from sqaudio.train import load_model, pick_device

CHUNK_SECONDS = 10.0      # long inputs are processed in windows of this much audio (bounded memory)
ENCODER_CONTEXT = 16      # latents per side: covers the encoder's receptive field (codes are exact)
DECODER_CONTEXT = 100     # latents per side (2 s) for the bi-GRU decoder; crossfaded over DECODER_FADE
DECODER_FADE = 50
VOCODER_CONTEXT = 32      # mel frames per side for the vocoder; crossfaded over VOCODER_FADE
VOCODER_FADE = 16


@dataclass
class Encoded:
    """Codes of one file and what is needed to decode them."""

    codes: np.ndarray        # (T',) int64
    speaker: str
    samples: int             # input length at the feature sample rate
    mel: np.ndarray          # (n_mels, frames) input features (even frame count)
    speaker_from: str = ""   # how the speaker was chosen: --speaker, file name, folder name, or fallback


class Codec:
    """A speech SQ-VAE checkpoint plus a vocoder.

    Args:
        model: run directory or checkpoint of a speech SQ-VAE.
        vocoder: "griffin-lim", a vocoder directory/checkpoint, or a pretrained parallel-wavegan directory.
        device: auto, cpu, cuda ...
        chunk_seconds: window length for long inputs (memory is bounded by it, not by the input's length).
    """

    def __init__(self, model: str | Path, vocoder: str | Path = "griffin-lim", device: str | None = None,
                 chunk_seconds: float = CHUNK_SECONDS):
        from sqaudio.vocoder import load_vocoder

        self.device = pick_device(device)
        self.model, state = load_model(model, self.device)
        if self.model.recipe.data.kind != "speech":
            raise UserError(f"{model} is an image model; reconstruct/encode/decode need a speech model")
        self.features: FeatureConfig = from_dict(FeatureConfig, state["features"], "features")
        self.speakers: list[str] = state["speakers"]
        self.model_id = fingerprint(self.model)
        self.vocoder = load_vocoder(str(vocoder), device=self.device) if vocoder is not None else None
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

    @torch.no_grad()
    def encode(self, path: Path, speaker: str | None = None, step: Callable[[], None] | None = None) -> Encoded:
        wav = load_audio(path, self.features)
        mel = self.logmel(torch.from_numpy(wav)[None].to(self.device))
        mel = mel[:, :, : mel.shape[-1] - mel.shape[-1] % 2]  # (1, n_mels, T), T even
        latents = int(encoder_lengths(torch.tensor(mel.shape[-1])).item())
        if latents < 1:
            raise UserError(f"{path}: too short for one latent frame")
        codes = overlap_apply(lambda s, e: self.model.encode({"mel": mel[:, :, 2 * s:2 * e + 2]})[0], latents,
                              self.chunk_latents, ENCODER_CONTEXT, on_window=step)  # (1, T') exact
        name, how = self.speaker_for(path, speaker)
        return Encoded(codes[0].cpu().numpy().astype(np.int64), name, len(wav), mel[0].cpu().numpy(), how)

    @torch.no_grad()
    def decode_mel(self, codes: np.ndarray, speaker: str, step: Callable[[], None] | None = None) -> torch.Tensor:
        """Codes (T',) -> decoder log-mel (1, n_mels, 2 T') (the input's frames 1..2T')."""
        if codes.ndim != 1 or codes.size == 0 or codes.min() < 0 or codes.max() >= self.model.recipe.quantizer.codebook_size:
            raise UserError("codes do not fit this model's codebook")
        z_q = self.model.quantizer.lookup(torch.from_numpy(codes)[None].to(self.device))  # (1, D, T')
        spk = torch.tensor([self.speaker_index(speaker)], device=self.device)
        return overlap_apply(lambda s, e: self.model.decode(z_q[:, :, s:e], spk), codes.size, self.chunk_latents,
                             DECODER_CONTEXT, scale=2, fade=DECODER_FADE, on_window=step)

    @torch.no_grad()
    def synthesize(self, mel: torch.Tensor, samples: int, step: Callable[[], None] | None = None) -> np.ndarray:
        """Decoder log-mel (1, n_mels, F) -> waveform of exactly `samples` samples (edge frames restored)."""
        if self.vocoder is None:
            raise UserError("no vocoder given")
        frames = samples // self.features.hop_length + 1
        pad_right = max(frames - mel.shape[-1] - 1, 0)
        full = torch.cat([mel[:, :, :1], mel, mel[:, :, -1:].expand(-1, -1, pad_right)], dim=-1)
        wav = overlap_apply(lambda s, e: self.vocoder.generate(full[:, :, s:e]).float(), full.shape[-1],
                            2 * self.chunk_latents, VOCODER_CONTEXT, scale=self.features.hop_length,
                            fade=VOCODER_FADE, on_window=step)
        wav = self.vocoder.finish(wav)[0].cpu().numpy()
        return wav[:samples] if len(wav) >= samples else np.pad(wav, (0, samples - len(wav)))

    def decode(self, codes: np.ndarray, speaker: str, samples: int,
               step: Callable[[], None] | None = None) -> np.ndarray:
        """Codes (T',) -> waveform of `samples` samples, window by window (see `windows`)."""
        return self.synthesize(self.decode_mel(codes, speaker, step), samples, step)

    def reconstruct(self, path: Path, speaker: str | None = None, step: Callable[[], None] | None = None
                    ) -> tuple[np.ndarray, dict[str, Any], Encoded, torch.Tensor]:
        """Waveform, statistics (codes used, bitrate, the file's mel-MSE in dB^2), the codes and the decoded
        log-mel (1, n_mels, frames). `step` is called after each model window (see `windows`)."""
        enc = self.encode(path, speaker, step)
        mel_hat = self.decode_mel(enc.codes, enc.speaker, step)
        target = torch.from_numpy(enc.mel[:, 1:-1])
        sse = ((mel_hat[0].cpu() - target) ** 2).sum().item()
        stats = {"codes_used": int(np.unique(enc.codes).size), "latent_frames": int(enc.codes.size),
                 "bitrate_bps": float(np.log2(self.model.recipe.quantizer.codebook_size) * self.features.frame_rate / 2),
                 "mel_mse_db2": mel_mse_db2(sse, self.features.n_mels, target.shape[-1], self.features.top_db),
                 "speaker": enc.speaker}
        return self.synthesize(mel_hat, enc.samples, step), stats, enc, mel_hat

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
    import soundfile as sf

    from sqaudio.checkpoint import atomic_write

    atomic_write(path, lambda tmp: sf.write(str(tmp), np.clip(wav, -1, 1), rate, subtype="PCM_16", format="WAV"))


def code_files(path: Path, fmt: str) -> list[Path]:
    """The files `write_codes` writes for codes at `path` (<name>.npy): npy + json header, or zerospeech .txt."""
    if fmt == "zerospeech":
        return [path.with_suffix(".txt")]
    if fmt != "npy":
        raise UserError(f"unknown codes format '{fmt}' (valid: npy, zerospeech)")
    return [path.with_suffix(".npy"), path.with_suffix(".json")]


def write_codes(path: Path, codec: Codec, enc: Encoded, fmt: str) -> list[Path]:
    """`npy`: <path>.npy + <path>.json header; `zerospeech`: <path>.txt, one codebook vector per latent frame."""
    from sqaudio.checkpoint import atomic_write

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
