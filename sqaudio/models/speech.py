"""The reference speech encoder (conv, x2 down) and speaker-conditioned bi-GRU decoder, with masks.

Masks make variable-length batches exact: padded positions are zeroed after every layer (so the next conv
sees the zero padding a lone utterance would see), BatchNorm statistics count valid positions only, jitter
stays inside each utterance and the GRU runs on packed sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sqaudio.config import SpeechModelConfig
from sqaudio.distributed import active, sum_all
from sqaudio.models import noise


def encoder_lengths(frames: Tensor) -> Tensor:
    """Latent positions for inputs of `frames` frames: conv k3 (no pad), then k4 stride 2 pad 1."""
    return torch.div(frames - 2 - 4 + 2, 2, rounding_mode="floor") + 1


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """(B,) lengths -> (B, size) bool, True where the position is valid."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C, T) whose batch statistics count only positions where mask is True.

    Under torch.distributed the statistics are summed over all ranks (synchronised BatchNorm), so a
    multi-process run normalises exactly like one process holding the whole global batch.
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if not self.training or (mask is None and not active()):
            return super().forward(x)
        weights = (mask[:, None, :] if mask is not None else torch.ones_like(x[:, :1])).to(x.dtype)  # (B, 1, T)
        count = sum_all(weights.sum())
        mean = sum_all((x * weights).sum(dim=(0, 2))) / count
        var = sum_all((((x - mean[None, :, None]) ** 2) * weights).sum(dim=(0, 2))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_((var * count / (count - 1).clamp(min=1)).detach(), momentum)
        y = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + self.eps)
        return y * self.weight[None, :, None] + self.bias[None, :, None]


class SpeechEncoder(nn.Module):
    """Log-mel (B, n_mels, T) -> latents (B, out_channels, T') with T' = encoder_lengths(T).

    Args:
        n_mels: input feature channels.
        cfg: speech model sizes.
        out_channels: quantizer dim plus the quantizer's variance channels.
    """

    def __init__(self, n_mels: int, cfg: SpeechModelConfig, out_channels: int):
        super().__init__()
        width = cfg.channels
        specs = [(n_mels, 3, 1, 0), (width, 3, 1, 1), (width, 4, 2, 1), (width, 3, 1, 1), (width, 3, 1, 1)]
        self.convs = nn.ModuleList(nn.Conv1d(inputs, width, kernel, stride, padding, bias=False)
                                   for inputs, kernel, stride, padding in specs)
        self.norms = nn.ModuleList(MaskedBatchNorm1d(width) for _ in specs)
        self.out = nn.Conv1d(width, out_channels, 1)

    def forward(self, mel: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = mel
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            mask = None
            if lengths is not None:
                lengths = _conv_lengths(lengths, conv)
                mask = length_mask(lengths, x.shape[-1])
            x = F.relu(norm(x, mask))
            if mask is not None:
                x = x * mask[:, None, :]
        return self.out(x)


def _conv_lengths(lengths: Tensor, conv: nn.Conv1d) -> Tensor:
    (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
    return torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1


class Jitter(nn.Module):
    """Replace each latent by a neighbour with probability p/2 per side (training only), within each utterance.

    Args:
        p: total replacement probability.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, z: Tensor, lengths: Tensor | None = None) -> Tensor:  # z: (B, D, T)
        if not self.training or self.p == 0.0:
            return z
        batch, dim, size = z.shape
        uniform = noise.uniform((batch, size), z.device)  # keyed by (seed, step, sample) in training
        shift = (uniform >= self.p / 2).long() + (uniform >= 1 - self.p / 2).long() - 1  # -1, 0, +1 w.p. p/2, 1-p, p/2
        last = (lengths if lengths is not None else torch.full((batch,), size, device=z.device)) - 1
        index = torch.arange(size, device=z.device)[None, :] + shift  # (B, T): neighbour to copy from
        index = torch.minimum(index.clamp(min=0), last[:, None].clamp(min=0))  # stay inside each utterance
        return torch.gather(z, 2, index[:, None, :].expand(-1, dim, -1))


class SpeechDecoder(nn.Module):
    """Latents (B, D, T') + speaker ids (B,) -> log-mel (B, n_mels, 2 T').

    Args:
        dim: latent dim.
        n_mels: output channels.
        cfg: speech model sizes (speaker table size, embedding and GRU widths).
    """

    def __init__(self, dim: int, n_mels: int, cfg: SpeechModelConfig):
        super().__init__()
        self.speaker_embedding = nn.Embedding(max(cfg.n_speakers, 1), cfg.speaker_dim)
        self.rnn = nn.GRU(dim + cfg.speaker_dim, cfg.rnn_hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * cfg.rnn_hidden, n_mels)

    def forward(self, z: Tensor, speakers: Tensor, lengths: Tensor | None = None) -> Tensor:
        z = F.interpolate(z, scale_factor=2.0, mode="nearest").transpose(1, 2)  # (B, 2T', D)
        spk = self.speaker_embedding(speakers)[:, None, :].expand(-1, z.shape[1], -1)
        x = torch.cat([z, spk], dim=-1)
        if lengths is None:
            x, _ = self.rnn(x)
        else:
            packed = pack_padded_sequence(x, (2 * lengths).cpu(), batch_first=True, enforce_sorted=False)
            x, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=z.shape[1])
        return self.fc(x).transpose(1, 2)  # (B, n_mels, 2T')
