"""The reference speech encoder (conv, x2 down) and speaker-conditioned bi-GRU decoder, with masks.

Masks make variable-length batches exact: padded positions are zeroed after every layer (so the next conv
sees the zero padding a lone utterance would see), BatchNorm statistics count valid positions only, jitter
stays inside each utterance and each GRU direction runs within its utterance's length (`masked_bigru`).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqaudio.config import SpeechModelConfig
from sqaudio.distributed import active, sum_all
from sqaudio.models import noise

# On CUDA the fused parameters of a layer (`masked_bigru`) are not a flattened cuDNN buffer, so cuDNN copies them
# (a few hundred kB) at each call and says so in a UserWarning; that copy is cheap and expected here, so the
# warning is silenced for calls from this module only.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk",
                        category=UserWarning, module=__name__)


def encoder_lengths(frames: Tensor | int) -> Tensor | int:
    """Latent positions for inputs of `frames` frames (a tensor or a Python int, answered in kind): conv k3 (no
    pad), then k4 stride 2 pad 1."""
    return (frames - 2 - 4 + 2) // 2 + 1


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
                # momentum None: the cumulative average, its weight kept on the device (no host read)
                momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
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


def reversal_index(lengths: Tensor, size: int) -> Tensor:
    """(B,) lengths -> (B, size) positions that reverse each row within its length (padding stays in place).

    The map is its own inverse, so gathering with it twice restores the order.
    """
    position = torch.arange(size, device=lengths.device)[None, :]
    return torch.where(position < lengths[:, None], lengths[:, None] - 1 - position, position)


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, C) reordered along time by index (B, T)."""
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def _paired(forward: Tensor, backward: Tensor, hidden: int) -> Tensor:
    """Two directions' gate-stacked (r, z, n) rows (3H, ...) interleaved gate by gate -> (6H, ...): the layout of
    one GRU of width 2H whose units 0..H-1 are `forward`'s and H..2H-1 `backward`'s."""
    return torch.stack([forward.unflatten(0, (3, hidden)), backward.unflatten(0, (3, hidden))], dim=1).flatten(0, 2)


def _block_diagonal(forward: Tensor, backward: Tensor, hidden: int) -> Tensor:
    """Two directions' weights (3H, A) and (3H, B) -> (6H, A + B): forward units read the first A inputs, backward
    units the last B (exact zeros elsewhere)."""
    return _paired(F.pad(forward, (0, backward.shape[1])), F.pad(backward, (forward.shape[1], 0)), hidden)


def _fused_layer(rnn: nn.GRU, layer: int) -> list[Tensor]:
    """Layer `layer` of bidirectional `rnn` as the parameters of one unidirectional GRU of width 2 H."""
    def both(name: str) -> tuple[Tensor, Tensor, int]:
        own = f"{name}_l{layer}"
        return getattr(rnn, own), getattr(rnn, own + "_reverse"), rnn.hidden_size

    return [_block_diagonal(*both("weight_ih")), _block_diagonal(*both("weight_hh")),
            _paired(*both("bias_ih")), _paired(*both("bias_hh"))]


def masked_bigru(rnn: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    """A batch-first bidirectional `rnn` (no dropout) over x (B, T, I) padded after each row's length.

    Equal, at valid positions, to running `rnn` on the packed sequences, without moving lengths to the host:
    the forward direction is causal, so padding after a row's end never reaches its valid outputs; the backward
    direction runs forward in time over each row reversed within its length, and its outputs are reversed back.
    Outputs at padded positions are unspecified.

    Each layer's two directions run as one GRU of width 2 H on [x, x reversed]: its weights are `rnn`'s own
    parameters of that layer placed block-diagonally (the exact zeros off the blocks change no sum), so each unit
    computes exactly its direction's recurrence, gradients reach `rnn`'s parameters (same state-dict keys), and a
    layer takes T sequential steps, not 2 T: on a CPU a small batch is bound by the operations of each step, not
    their arithmetic. `torch.gru` is the public op nn.GRU itself calls (cuDNN on CUDA, ATen's loop on the CPU), so
    no module is swapped (as `torch.func.functional_call` would) and no Python loop runs over time.
    """
    index = reversal_index(lengths, x.shape[1])
    hidden = rnn.hidden_size
    for layer in range(rnn.num_layers):
        both = torch.cat([x, _gather_time(x, index)], dim=-1)
        h0 = both.new_zeros(1, both.shape[0], 2 * hidden)
        out, _ = torch.gru(both, h0, _fused_layer(rnn, layer), True, 1, 0.0, rnn.training, False, True)
        x = torch.cat([out[..., :hidden], _gather_time(out[..., hidden:], index)], dim=-1)
    return x


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
        x = self.rnn(x)[0] if lengths is None else masked_bigru(self.rnn, x, 2 * lengths)
        return self.fc(x).transpose(1, 2)  # (B, n_mels, 2T')
