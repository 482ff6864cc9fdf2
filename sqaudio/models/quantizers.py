"""The quantizer interface and the math every quantizer shares (the quantizers: sqaudio.models.stochastic, .vq).

A quantizer takes channels-first encoder outputs `z` (B, D, *S) (speech S = (T,), images S = (H, W)), the
encoder's extra variance channels (B, n_var_channels, *S) and an optional validity mask (B, *S), and returns a
`QuantizerOutput`: the latents for the decoder, the codes, named batch-averaged loss terms and detached
statistics. Padded positions never change a loss, a statistic, a gradient or the EMA codebook.
All quantizer arithmetic runs in float32 (or float64) with autocast disabled.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqaudio.errors import UserError
from sqaudio.models import noise


@dataclasses.dataclass
class QuantizerOutput:
    """What every quantizer returns.

    Args:
        z_q: (B, D, *S) latents for the decoder (training SQ: the relaxed sample; VQ: straight-through).
        codes: (B, *S) long, the code per position (argmax of P_hat; at inference the code used for z_q).
        losses: named scalar loss terms, already batch-averaged; the objective adds them all.
        stats: detached scalars for logs ("perplexity", "entropy", "var_q", Gaussian also "var_q_harmonic" =
            1 / mean precision; VQ: "perplexity", "used_codes").
    """

    z_q: Tensor
    codes: Tensor
    losses: dict[str, Tensor]
    stats: dict[str, Tensor]


def weighted_sq_distance(z: Tensor, codebook: Tensor, weight: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """scale * sum_d w_d (z_nd - b_kd)^2 for every row n and code k, as one matrix product (no (N, D, K) tensor).

    Args:
        z: (N, D) points. codebook: (K, D).
        weight: None (all ones), a per-row scalar (N, 1) or (1, 1), or a per-row diagonal (N, D).
        scale: factor applied inside the product (-1 gives logits without another (N, K) tensor).
    Returns:
        (N, K) distances, expanded as sum w z^2 - 2 (w z) . b_k + w . b_k^2.
    """
    rows = z.shape[0]
    weight = z.new_ones(1, 1) if weight is None else weight
    weighted = weight * z                                         # (N, D)
    z_terms = (weighted * z).sum(-1, keepdim=True)                # (N, 1): sum w z^2
    if weight.shape[-1] == 1:
        code_terms = codebook.square().sum(-1, keepdim=True)      # (K, 1): |b_k|^2
    else:
        code_terms = codebook.square()                            # (K, D): b_kd^2
    lhs = torch.cat([weighted, weight.expand(rows, -1)], dim=-1)  # (N, D + 1) or (N, 2D)
    rhs = torch.cat([-2.0 * codebook, code_terms], dim=-1)        # (K, D + 1) or (K, 2D)
    return torch.addmm(z_terms, lhs, rhs.t(), beta=scale, alpha=scale)  # (N, K)


def gumbel_softmax(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Soft Gumbel-softmax sample softmax((logits + g) / tau) along the last dim (reparameterised)."""
    eps = torch.finfo(logits.dtype).eps
    uniform = noise.uniform(logits.shape, logits.device, logits.dtype)  # keyed by (seed, step, sample) in training
    noisy = uniform.clamp_(eps, 1 - eps).log_().neg_().log_().neg_()  # ~ Gumbel(0, 1)
    return torch.softmax(noisy.add_(logits).div_(temperature), dim=-1)  # in place: one (N, K) buffer


def code_counts(codes: Tensor, valid: Tensor, codebook_size: int) -> Tensor:
    """(K,) float64 uses of each code over valid positions (index_add_: no boolean indexing, no host sync)."""
    counts = torch.zeros(codebook_size, dtype=torch.float64, device=codes.device)
    return counts.index_add_(0, codes.reshape(-1), valid.reshape(-1).to(torch.float64))


def code_usage(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Perplexity exp(H(average one-hot usage)) and the number of distinct codes, from `code_counts` (summed over
    the ranks under DDP, so that every rank reports the global batch's usage)."""
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
    return perplexity.float(), (counts > 0).sum()


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of per-position values x (B, N) over valid positions."""
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp_min(1)


class Quantizer(nn.Module):
    """Base class: layout, masking and precision handling; subclasses implement `_quantize` on (B, N, D).

    Args:
        codebook_size: K, the number of codes.
        dim: D, the latent dimension.
    """

    n_var_channels: int = 0

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise UserError(f"quantizer.codebook_size and quantizer.dim must be >= 1, got {codebook_size} and {dim}")
        self.codebook_size = codebook_size
        self.dim = dim

    def forward(self, z: Tensor, var_logits: Tensor | None = None, mask: Tensor | None = None,
                temperature: float | Tensor = 1.0) -> QuantizerOutput:
        """Quantize z (B, D, *S); var_logits (B, n_var_channels, *S); mask (B, *S) bool, True = valid."""
        batch, spatial = z.shape[0], z.shape[2:]
        self._check_shapes(z, var_logits, mask)
        valid = (torch.ones(z.shape[:1] + spatial, dtype=torch.bool, device=z.device) if mask is None
                 else mask.to(torch.bool)).reshape(batch, -1)      # (B, N)
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            latents = self._channels_last(z, valid, dtype)         # (B, N, D)
            variances = None if var_logits is None else self._channels_last(var_logits, valid, dtype)
            z_q, codes, losses, stats = self._quantize(latents, variances, valid, temperature)
        z_q = z_q.transpose(1, 2).reshape(z.shape)                 # (B, N, D) -> (B, D, *S)
        return QuantizerOutput(z_q, codes.reshape(z.shape[:1] + spatial), losses,
                               {k: v.detach() for k, v in stats.items()})

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, *S) long codes -> (B, D, *S) codebook vectors (what the decoder gets at inference)."""
        return F.embedding(codes, self.codebook_vectors()).movedim(-1, 1)

    def codebook_vectors(self) -> Tensor:
        """(K, D) vectors the codes stand for."""
        return self.codebook

    def _quantize(self, z: Tensor, var_logits: Tensor | None, valid: Tensor, temperature):
        raise NotImplementedError

    @staticmethod
    def _channels_last(x: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, C, *S) -> (B, N, C) in `dtype`, padded positions set to 0 (so they stay finite and inert)."""
        x = x.to(dtype).flatten(2).transpose(1, 2)                 # (B, N, C)
        return torch.where(valid.unsqueeze(-1), x, 0.0)

    def _check_shapes(self, z: Tensor, var_logits: Tensor | None, mask: Tensor | None) -> None:
        if z.dim() < 3 or z.shape[1] != self.dim:
            raise ValueError(f"z must be (B, {self.dim}, *S), got {tuple(z.shape)}")
        if self.n_var_channels == 0 and var_logits is not None:
            raise ValueError(f"{type(self).__name__} takes no var_logits")
        if self.n_var_channels > 0:
            want = (z.shape[0], self.n_var_channels, *z.shape[2:])
            if var_logits is None or tuple(var_logits.shape) != want:
                got = None if var_logits is None else tuple(var_logits.shape)
                raise ValueError(f"var_logits must be {want}, got {got}")
        if mask is not None and tuple(mask.shape) != (z.shape[0], *z.shape[2:]):
            raise ValueError(f"mask must be {(z.shape[0], *z.shape[2:])}, got {tuple(mask.shape)}")
