"""The stochastic quantizers of the SQ-VAE: Gaussian SQ (variants I-IV), fixed-variance SQ and vMF SQ.

The Gaussian SQ follows sony/sqvae (Takida et al., ICML 2022): logits = -sum_d (z_d - b_kd)^2 / (2 var_d),
Gumbel-softmax relaxed sample in training (soft, no straight-through), argmax (or a sample) at inference,
loss = per-sample sum of [0.5 * precision * (z - z_q)^2] + [sum_k P log P], averaged over the batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqaudio.config import QuantizerConfig
from sqaudio.distributed import sum_all
from sqaudio.errors import UserError
from sqaudio.models.quantizers import (
    Quantizer,
    code_counts,
    code_usage,
    gumbel_softmax,
    masked_mean,
    weighted_sq_distance,
)

VAR_CLAMP_MIN = 1e-10  # "add" combine: precision = 1 / max(var, VAR_CLAMP_MIN) (as the reference)


class _NegEntropy(torch.autograd.Function):
    """sum_k P_k log P_k over the last dim, P = softmax(logits); keeps only log P (one (N, K) tensor) for
    backward, where d/dl_k = P_k (log P_k - sum_j P_j log P_j)."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        log_p = torch.log_softmax(logits, dim=-1)
        out = log_p.exp().mul_(log_p).sum(-1)
        ctx.save_for_backward(log_p, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        log_p, out = ctx.saved_tensors
        return (log_p - out.unsqueeze(-1)).mul_(log_p.exp()).mul_(grad.unsqueeze(-1))


class StochasticQuantizer(Quantizer):
    """Shared by the SQ quantizers: sampling from P_hat = softmax(logits), the entropy term and statistics.

    Args:
        cfg: the quantizer config (uses codebook_size, dim, sample_at_inference).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg.codebook_size, cfg.dim)
        self.sample_at_inference = cfg.sample_at_inference
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.dim) * cfg.codebook_init_std)

    def _sample(self, logits: Tensor, codebook: Tensor, temperature) -> tuple[Tensor, Tensor]:
        """(B, N, K) logits -> z_q (B, N, D) and codes (B, N)."""
        if self.training:
            return gumbel_softmax(logits, temperature) @ codebook, logits.argmax(-1)
        if self.sample_at_inference:
            codes = torch.distributions.Categorical(logits=logits).sample()
        else:
            codes = logits.argmax(-1)
        return F.embedding(codes, codebook), codes

    def _finish(self, logits: Tensor, distance: Tensor, codes: Tensor, valid: Tensor,
                var_q: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Batch-averaged losses from per-position distance terms (B, N) and the stats."""
        batch = logits.shape[0]
        neg_entropy = _NegEntropy.apply(logits)                     # (B, N): sum_k P log P
        losses = {"latent_distance": torch.where(valid, distance, 0.0).sum() / batch,
                  "latent_entropy": torch.where(valid, neg_entropy, 0.0).sum() / batch}
        perplexity, _ = code_usage(sum_all(code_counts(codes, valid, self.codebook_size)))
        stats = {"perplexity": perplexity, "entropy": -masked_mean(neg_entropy, valid), "var_q": var_q}
        return losses, stats


# Variance heads: how the encoder's log-variance channels (B, N, C) become log sigma^2 before the scalar is
# combined, broadcastable to (B, N, D): variant I none, II one per sample, III one per position, IV diagonal.
def _log_var_none(log_var: Tensor | None, valid: Tensor, like: Tensor) -> Tensor:
    return like.new_zeros(1, 1, 1)


def _log_var_per_sample(log_var: Tensor, valid: Tensor, like: Tensor) -> Tensor:
    total = torch.where(valid.unsqueeze(-1), log_var, 0.0).sum(dim=(1, 2))
    count = valid.sum(1).clamp_min(1) * log_var.shape[-1]
    return (total / count).view(-1, 1, 1)                          # (B, 1, 1)


def _log_var_per_position(log_var: Tensor, valid: Tensor, like: Tensor) -> Tensor:
    return log_var.mean(-1, keepdim=True)                          # (B, N, 1)


def _log_var_diagonal(log_var: Tensor, valid: Tensor, like: Tensor) -> Tensor:
    return log_var                                                 # (B, N, D)


_VARIANCE_HEADS: dict[int, Callable[[Tensor | None, Tensor, Tensor], Tensor]] = {
    1: _log_var_none, 2: _log_var_per_sample, 3: _log_var_per_position, 4: _log_var_diagonal}


# Combining with the learned log-variance scalar s: returns (var, precision).
def _combine_log_add(log_var: Tensor, scalar: Tensor) -> tuple[Tensor, Tensor]:
    """Speech reference: var = exp(log_var + s)."""
    total = log_var + scalar
    return total.exp(), (-total).exp()


def _combine_add(log_var: Tensor, scalar: Tensor) -> tuple[Tensor, Tensor]:
    """Image reference: var = exp(log_var) + exp(s) (variant I: 1 + exp(s))."""
    var = log_var.exp() + scalar.exp()
    return var, 1.0 / var.clamp_min(VAR_CLAMP_MIN)


_VAR_COMBINE: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "log_add": _combine_log_add, "add": _combine_add}


def _n_var_channels(variant: int, combine: str, dim: int) -> int:
    """Encoder channels the variance head consumes: speech (log_add) III: 1, IV: D; images (add) II-IV: D."""
    if variant == 1:
        return 0
    return 1 if combine == "log_add" and variant in (2, 3) else dim


class GaussianSQ(StochasticQuantizer):
    """Gaussian SQ-VAE quantizer with covariance variant I-IV (self-annealed sigma_phi^2).

    Args:
        cfg: quantizer config: variant (1-4), var_combine ("log_add" speech, "add" images), var_init
            (initial exp(s)), codebook_size, dim, sample_at_inference.
    """

    trainable_variance = True

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        if cfg.variant not in _VARIANCE_HEADS:
            raise UserError(f"quantizer.variant must be one of 1, 2, 3, 4, got {cfg.variant}")
        if cfg.var_combine not in _VAR_COMBINE:
            raise UserError(f"quantizer.var_combine must be one of {', '.join(_VAR_COMBINE)}, "
                            f"got '{cfg.var_combine}'")
        if not cfg.var_init > 0:
            raise UserError(f"quantizer.var_init must be > 0, got {cfg.var_init}")
        log_var_init = torch.tensor(math.log(cfg.var_init))
        if self.trainable_variance:
            self.log_var_scalar = nn.Parameter(log_var_init)
        else:
            self.register_buffer("log_var_scalar", log_var_init)
        self.variant = cfg.variant
        self._variance_head = _VARIANCE_HEADS[cfg.variant]
        self._combine = _VAR_COMBINE[cfg.var_combine]
        self.n_var_channels = _n_var_channels(cfg.variant, cfg.var_combine, cfg.dim)

    def variance(self, var_logits: Tensor | None, valid: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sigma_phi^2 and its inverse, each broadcastable to (B, N, D)."""
        log_var = self._variance_head(var_logits, valid, like)
        return self._combine(log_var, self.log_var_scalar.to(like.dtype))

    def _quantize(self, z, var_logits, valid, temperature):
        batch, positions, dim = z.shape
        codebook = self.codebook.to(z.dtype)
        var, precision = self.variance(var_logits, valid, z)       # (B|1, N|1, 1|D)
        weight = (0.5 * precision).expand(batch, positions, -1).reshape(batch * positions, -1)
        logits = weighted_sq_distance(z.reshape(batch * positions, dim), codebook, weight, scale=-1.0)
        logits = logits.view(batch, positions, -1)                 # (B, N, K)
        z_q, codes = self._sample(logits, codebook, temperature)
        distance = 0.5 * (precision * (z - z_q).square()).sum(-1)  # (B, N)
        var_q = masked_mean(var.expand(batch, positions, -1).mean(-1), valid)
        losses, stats = self._finish(logits, distance, codes, valid, var_q)
        # the variance the distance sees: 1 / mean precision (unused IV dimensions, whose variance drifts
        # very large, dominate the plain mean but not this)
        stats["var_q_harmonic"] = 1.0 / masked_mean(precision.expand(batch, positions, -1).mean(-1), valid)
        return z_q, codes, losses, stats


class FixedGaussianSQ(GaussianSQ):
    """The SQ quantizer with sigma_phi^2 frozen at var_init (no self-annealing); variant I only.

    Args:
        cfg: quantizer config (var_init, codebook_size, dim, sample_at_inference).
    """

    trainable_variance = False

    def __init__(self, cfg: QuantizerConfig):
        if cfg.variant != 1:
            raise UserError(f"quantizer.kind 'fixed_gaussian' needs quantizer.variant 1, got {cfg.variant}")
        super().__init__(dataclasses.replace(cfg, var_combine="log_add"))  # var = var_init exactly


class VmfSQ(StochasticQuantizer):
    """vMF SQ-VAE quantizer: z and codes on the unit sphere, logits kappa_q <z, b_k>, kappa_q = exp(s) + 1.

    Args:
        cfg: quantizer config (var_init: initial kappa_q - 1, codebook_size, dim, sample_at_inference).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        if not cfg.var_init > 0:
            raise UserError(f"quantizer.var_init must be > 0, got {cfg.var_init}")
        self.log_kappa_scalar = nn.Parameter(torch.tensor(math.log(cfg.var_init)))

    def codebook_vectors(self) -> Tensor:
        return F.normalize(self.codebook, dim=-1)

    def _quantize(self, z, var_logits, valid, temperature):
        z = F.normalize(z, dim=-1)                                 # (B, N, D) on the sphere
        codebook = self.codebook_vectors().to(z.dtype)
        kappa = self.log_kappa_scalar.to(z.dtype).exp() + 1.0
        logits = kappa * (z @ codebook.t())                        # (B, N, K)
        z_q, codes = self._sample(logits, codebook, temperature)
        distance = kappa * (z * (z - z_q)).sum(-1)                 # (B, N)
        return (z_q, codes) + self._finish(logits, distance, codes, valid, kappa)

