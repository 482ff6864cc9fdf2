"""The SQ-VAE: encoder -> quantizer -> decoder -> likelihood. Nothing dataset-specific lives here.

A batch is a dict. Speech: {"mel": (B, n_mels, T), "lengths": (B,) frames, "speaker": (B,)}; the decoder
predicts mel[:, :, 1:-1] (two frames of context). Images: {"x": (B, C, H, W)} (vMF: long (B, H, W)).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sqaudio import checkpoint
from sqaudio.config import QuantizerConfig, Recipe, saved_recipe
from sqaudio.errors import UserError
from sqaudio.models.likelihoods import build_likelihood
from sqaudio.models.quantizers import Quantizer
from sqaudio.models.speech import Jitter, SpeechDecoder, SpeechEncoder, encoder_lengths, length_mask
from sqaudio.models.stochastic import FixedGaussianSQ, GaussianSQ, VmfSQ
from sqaudio.models.vq import VQEMA

QUANTIZERS: dict[str, type[Quantizer]] = {
    "gaussian": GaussianSQ, "fixed_gaussian": FixedGaussianSQ, "vq_ema": VQEMA, "vmf": VmfSQ}


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    """The quantizer named by cfg.kind (a UserError lists the valid kinds)."""
    if cfg.kind not in QUANTIZERS:
        raise UserError(f"unknown quantizer.kind '{cfg.kind}' (valid: {', '.join(QUANTIZERS)})")
    return QUANTIZERS[cfg.kind](cfg)


@dataclass
class ModelOutput:
    x_hat: Tensor                # reconstruction (decoder output)
    target: Tensor               # what x_hat is compared with
    mask: Tensor | None          # valid elements of target, broadcastable (speech: (B, 1, T)); None = all
    codes: Tensor                # (B, *S) code indices
    code_mask: Tensor | None     # (B, *S) valid latent positions
    losses: dict[str, Tensor]    # named terms; the objective is their sum
    stats: dict[str, Tensor]     # detached scalars for logs

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())


class SQVAE(nn.Module):
    """Shared assembly: split encoder channels, quantize, decode, score.

    Subclasses define `_encode(batch) -> (z, code_mask, aux)`, `_decode(z_q, batch, aux) -> x_hat` and
    `_target(batch, aux) -> (target, mask)`.
    """

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.quantizer = build_quantizer(recipe.quantizer)
        self.likelihood = build_likelihood(recipe.model, recipe.quantizer)
        self.dim = recipe.quantizer.dim

    @property
    def encoder_channels(self) -> int:
        return self.dim + self.quantizer.n_var_channels

    def _quantize(self, batch: dict[str, Tensor], temperature: float = 1.0):
        """Encode, split the encoder channels into latents and variance logits, quantize."""
        h, code_mask, aux = self._encode(batch)
        z, var = h[:, : self.dim], (h[:, self.dim:] if self.quantizer.n_var_channels else None)
        return self.quantizer(z, var_logits=var, mask=code_mask, temperature=temperature), code_mask, aux

    def forward(self, batch: dict[str, Tensor], temperature: float = 1.0, calibrate: bool = False) -> ModelOutput:
        if calibrate:
            return self._calibration_forward(batch)
        q, code_mask, aux = self._quantize(batch, temperature)
        x_hat = self._decode(q.z_q, batch, aux)
        target, mask = self._target(batch, aux)
        rec_losses, rec_stats = self.likelihood(x_hat, target, mask)
        return ModelOutput(x_hat, target, mask, q.codes, code_mask,
                           {**rec_losses, **q.losses}, {**rec_stats, **q.stats})

    def frozen_in_calibration(self) -> list[nn.Module]:
        """What the decoder-calibration phase freezes: the encoder (with its variance channels) and the
        quantizer (codebook, variance scalar, EMA state). Everything else (decoder, likelihood) trains."""
        return [self.encoder, self.quantizer]

    def _calibration_forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        """Decoder calibration (train.calibration_steps): the encoder in eval mode (BatchNorm running stats, no
        update) and the deterministic quantizer (argmax codes, no EMA update) run without gradient; the decoder
        decodes the codebook vectors of the argmax codes, exactly what evaluation decodes (no jitter), and only
        the model's own reconstruction likelihood is returned (the latent terms do not depend on the decoder)."""
        frozen = self.frozen_in_calibration()
        modes = [m.training for m in frozen]
        for m in frozen:
            m.eval()
        try:
            with torch.no_grad():
                q, code_mask, aux = self._quantize(batch)
                z_q = self.quantizer.lookup(q.codes).to(q.z_q.dtype)
        finally:
            for m, mode in zip(frozen, modes):
                m.train(mode)
        x_hat = self._decode_hard(z_q, batch, aux)
        target, mask = self._target(batch, aux)
        rec_losses, rec_stats = self.likelihood(x_hat, target, mask)
        return ModelOutput(x_hat, target, mask, q.codes, code_mask, rec_losses, {**rec_stats, **q.stats})

    def _decode_hard(self, z_q: Tensor, batch: dict[str, Tensor], aux) -> Tensor:
        """Decode as evaluation does (no training-time input noise such as jitter)."""
        return self._decode(z_q, batch, aux)

    @torch.no_grad()
    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Code indices (B, *S) and their validity mask (eval mode: deterministic unless configured)."""
        q, code_mask, _ = self._quantize(batch)
        return q.codes, code_mask


class SpeechSQVAE(SQVAE):
    """Speech SQ-VAE of the reference (conv encoder, jitter, speaker-conditioned bi-GRU decoder).

    Args:
        recipe: the full recipe (features.n_mels, model.speech sizes, quantizer).
    """

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        n_mels, cfg = recipe.features.n_mels, recipe.model.speech
        self.encoder = SpeechEncoder(n_mels, cfg, self.encoder_channels)
        self.jitter = Jitter(cfg.jitter)
        self.decoder = SpeechDecoder(self.dim, n_mels, cfg)

    def _encode(self, batch):
        lengths = batch.get("lengths")
        h = self.encoder(batch["mel"], lengths)  # (B, D + var, T')
        if lengths is None:
            return h, None, None
        latent_lengths = encoder_lengths(lengths)
        return h, length_mask(latent_lengths, h.shape[-1]), latent_lengths

    def _decode(self, z_q, batch, latent_lengths):
        return self.decode(self.jitter(z_q, latent_lengths), batch["speaker"], latent_lengths)

    def _decode_hard(self, z_q, batch, latent_lengths):
        return self.decode(z_q, batch["speaker"], latent_lengths)

    def decode(self, z_q: Tensor, speaker: Tensor, latent_lengths: Tensor | None = None) -> Tensor:
        """Quantized latents (B, D, T') -> log-mel (B, n_mels, 2 T')."""
        return self.decoder(z_q, speaker, latent_lengths)

    def _target(self, batch, latent_lengths):
        mel = batch["mel"]
        out_frames = 2 * encoder_lengths(mel.shape[-1])
        target = mel[:, :, 1:1 + out_frames]
        if latent_lengths is None:
            return target, None
        return target, length_mask(2 * latent_lengths, out_frames)[:, None, :]


class VisionSQVAE(SQVAE):
    """Image SQ-VAE with the reference ResNet encoder/decoder of its dataset (model.vision.network).

    Args:
        recipe: the full recipe (model.vision sizes, quantizer, likelihood).
    """

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        from sqaudio.models.vision import VisionDecoder, VisionEncoder, class_channels

        cfg = recipe.model.vision
        out_channels = class_channels(cfg.num_classes) if recipe.model.likelihood == "vmf" else cfg.in_channels
        self.encoder = VisionEncoder(cfg, self.encoder_channels, var_channels=self.quantizer.n_var_channels)
        self.decoder = VisionDecoder(cfg, self.dim, out_channels)

    def _encode(self, batch):
        return self.encoder(batch["x"]), None, None  # class maps are one-hot encoded by the encoder

    def _decode(self, z_q, batch, aux):
        return self.decoder(z_q)

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    def _target(self, batch, aux):
        return batch["x"], None


MODELS = {"speech": SpeechSQVAE, "vision": VisionSQVAE}


def build_model(recipe: Recipe) -> SQVAE:
    """The model named by recipe.model.kind (registry: speech, vision)."""
    try:
        cls = MODELS[recipe.model.kind]
    except KeyError:
        raise ValueError(f"unknown model kind '{recipe.model.kind}' (valid: {', '.join(MODELS)})") from None
    return cls(recipe)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[SQVAE, dict[str, Any]]:
    """Rebuild a model from a checkpoint (or the newest one of a run dir) with its own saved recipe."""
    state = checkpoint.load(checkpoint.latest(Path(path)))
    recipe = saved_recipe(state["recipe"], resuming=False)
    model = build_model(recipe)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
