"""Every quantizer behind one interface: Gaussian SQ (variants I-IV), fixed-variance SQ, vMF SQ, VQ-VAE (EMA).

A quantizer takes channels-first encoder outputs `z` (B, D, *S) (speech S = (T,), images S = (H, W)), the
encoder's extra variance channels (B, n_var_channels, *S) and an optional validity mask (B, *S), and returns a
`QuantizerOutput`: the latents for the decoder, the codes, named batch-averaged loss terms and detached
statistics. Padded positions never change a loss, a statistic, a gradient or the EMA codebook.

The Gaussian SQ follows sony/sqvae (Takida et al., ICML 2022): logits = -sum_d (z_d - b_kd)^2 / (2 var_d),
Gumbel-softmax relaxed sample in training (soft, no straight-through), argmax (or a sample) at inference,
loss = per-sample sum of [0.5 * precision * (z - z_q)^2] + [sum_k P log P], averaged over the batch.
All quantizer arithmetic runs in float32 (or float64) with autocast disabled.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqaudio.config import QuantizerConfig
from sqaudio.errors import UserError
from sqaudio.models import noise

VAR_CLAMP_MIN = 1e-10  # "add" combine: precision = 1 / max(var, VAR_CLAMP_MIN) (as the reference)


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
    n = z.shape[0]
    weight = z.new_ones(1, 1) if weight is None else weight
    wz = weight * z                                               # (N, D)
    zz = (wz * z).sum(-1, keepdim=True)                           # (N, 1)
    if weight.shape[-1] == 1:
        bb = codebook.square().sum(-1, keepdim=True)              # (K, 1): |b_k|^2
    else:
        bb = codebook.square()                                    # (K, D): b_kd^2
    lhs = torch.cat([wz, weight.expand(n, -1)], dim=-1)           # (N, D + 1) or (N, 2D)
    rhs = torch.cat([-2.0 * codebook, bb], dim=-1)                # (K, D + 1) or (K, 2D)
    return torch.addmm(zz, lhs, rhs.t(), beta=scale, alpha=scale)  # (N, K)


def gumbel_softmax(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Soft Gumbel-softmax sample softmax((logits + g) / tau) along the last dim (reparameterised)."""
    eps = torch.finfo(logits.dtype).eps
    uniform = noise.uniform(logits.shape, logits.device, logits.dtype)  # keyed by (seed, step, sample) in training
    noisy = uniform.clamp_(eps, 1 - eps).log_().neg_().log_().neg_()  # ~ Gumbel(0, 1)
    return torch.softmax(noisy.add_(logits).div_(temperature), dim=-1)  # in place: one (N, K) buffer


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


def code_usage(codes: Tensor, valid: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Perplexity exp(H(average one-hot usage)) and the number of distinct codes, over valid positions."""
    counts = torch.zeros(codebook_size, dtype=torch.float64, device=codes.device)  # no boolean indexing or
    counts.index_add_(0, codes.reshape(-1), valid.reshape(-1).to(torch.float64))  # bincount: no host sync
    counts = _all_reduce_sum(counts)  # under DDP: usage over the global batch, the same on every rank
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
    return perplexity.float(), (counts > 0).sum()


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of per-position values x (B, N) over valid positions."""
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp_min(1)


class Quantizer(nn.Module):
    """Base class: layout, masking and precision handling; subclasses implement `_quantize` on (B, N, D).

    Args:
        cfg: the quantizer config (codebook_size K, dim D, ...).
    """

    n_var_channels: int = 0

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        if cfg.codebook_size < 1 or cfg.dim < 1:
            raise UserError(f"quantizer.codebook_size and quantizer.dim must be >= 1, got "
                            f"{cfg.codebook_size} and {cfg.dim}")
        self.codebook_size = cfg.codebook_size
        self.dim = cfg.dim

    def forward(self, z: Tensor, var_logits: Tensor | None = None, mask: Tensor | None = None,
                temperature: float | Tensor = 1.0) -> QuantizerOutput:
        """Quantize z (B, D, *S); var_logits (B, n_var_channels, *S); mask (B, *S) bool, True = valid."""
        batch, spatial = z.shape[0], z.shape[2:]
        self._check_shapes(z, var_logits, mask)
        valid = (torch.ones(z.shape[:1] + spatial, dtype=torch.bool, device=z.device) if mask is None
                 else mask.to(torch.bool)).reshape(batch, -1)      # (B, N)
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = self._channels_last(z, valid, dtype)              # (B, N, D)
            vf = None if var_logits is None else self._channels_last(var_logits, valid, dtype)
            z_q, codes, losses, stats = self._quantize(zf, vf, valid, temperature)
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


class _StochasticQuantizer(Quantizer):
    """Shared by the SQ quantizers: sampling from P_hat = softmax(logits), the entropy term and statistics.

    Args:
        cfg: the quantizer config (uses codebook_size, dim, sample_at_inference).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
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
        perplexity, _ = code_usage(codes, valid, self.codebook_size)
        stats = {"perplexity": perplexity, "entropy": -_masked_mean(neg_entropy, valid), "var_q": var_q}
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


# Combining with the learned scalar s: returns (var, precision).
def _combine_log_add(log_var: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Speech reference: var = exp(log_var + s)."""
    total = log_var + s
    return total.exp(), (-total).exp()


def _combine_add(log_var: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Image reference: var = exp(log_var) + exp(s) (variant I: 1 + exp(s))."""
    var = log_var.exp() + s.exp()
    return var, 1.0 / var.clamp_min(VAR_CLAMP_MIN)


_VAR_COMBINE: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "log_add": _combine_log_add, "add": _combine_add}


def _n_var_channels(variant: int, combine: str, dim: int) -> int:
    """Encoder channels the variance head consumes: speech (log_add) III: 1, IV: D; images (add) II-IV: D."""
    if variant == 1:
        return 0
    return 1 if combine == "log_add" and variant in (2, 3) else dim


class GaussianSQ(_StochasticQuantizer):
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
        s = torch.tensor(math.log(cfg.var_init))
        if self.trainable_variance:
            self.log_var_scalar = nn.Parameter(s)
        else:
            self.register_buffer("log_var_scalar", s)
        self.variant = cfg.variant
        self._variance_head = _VARIANCE_HEADS[cfg.variant]
        self._combine = _VAR_COMBINE[cfg.var_combine]
        self.n_var_channels = _n_var_channels(cfg.variant, cfg.var_combine, cfg.dim)

    def variance(self, var_logits: Tensor | None, valid: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sigma_phi^2 and its inverse, each broadcastable to (B, N, D)."""
        log_var = self._variance_head(var_logits, valid, like)
        return self._combine(log_var, self.log_var_scalar.to(like.dtype))

    def _quantize(self, z, var_logits, valid, temperature):
        batch, n, dim = z.shape
        codebook = self.codebook.to(z.dtype)
        var, precision = self.variance(var_logits, valid, z)       # (B|1, N|1, 1|D)
        weight = (0.5 * precision).expand(batch, n, -1).reshape(batch * n, -1)
        logits = weighted_sq_distance(z.reshape(batch * n, dim), codebook, weight, scale=-1.0)
        logits = logits.view(batch, n, -1)                         # (B, N, K)
        z_q, codes = self._sample(logits, codebook, temperature)
        distance = 0.5 * (precision * (z - z_q).square()).sum(-1)  # (B, N)
        var_q = _masked_mean(var.expand(batch, n, -1).mean(-1), valid)
        losses, stats = self._finish(logits, distance, codes, valid, var_q)
        # the variance the distance sees: 1 / mean precision (unused IV dimensions, whose variance drifts
        # very large, dominate the plain mean but not this)
        stats["var_q_harmonic"] = 1.0 / _masked_mean(precision.expand(batch, n, -1).mean(-1), valid)
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


class VmfSQ(_StochasticQuantizer):
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


# The VQ-VAE commitment ||z - sg(e)||^2 reduced per objective, from per-position squared errors (B, N):
# textbook (van den Oord et al.; bshall/ZeroSpeech): the mean over valid elements (positions x dims), next to
# the plain MSE; mle_sigma: each sample's sum, averaged over the batch, next to (D/2) log MSE.
def _commit_mean(sq_err: Tensor, valid: Tensor, dim: int) -> Tensor:
    return sq_err.sum() / (valid.sum().clamp_min(1) * dim)


def _commit_sum(sq_err: Tensor, valid: Tensor, dim: int) -> Tensor:
    return sq_err.sum() / sq_err.shape[0]


VQ_COMMITMENT: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {"textbook": _commit_mean, "mle_sigma": _commit_sum}


class VQEMA(Quantizer):
    """VQ-VAE quantizer with an EMA codebook (bshall/ZeroSpeech style) and optional dead-code reset.

    The commitment beta * ||z - sg(e)||^2 is a mean over elements (vq_objective textbook) or a per-sample
    sum (mle_sigma); `sqaudio.models.likelihoods.build_likelihood` pairs the first with the plain MSE.

    Codebook starts uniform in +-1/K. In training mode each forward updates, from valid positions only:
    N_k <- decay N_k + (1 - decay) n_k (then Laplace-smoothed with epsilon), m_k <- decay m_k + (1 - decay)
    sum z, e_k = m_k / N_k. With vq_reset_threshold > 0, codes whose N_k falls below it are set to random
    valid encoder outputs of the batch (N_k = threshold). Under torch.distributed the counts and sums are
    all-reduced and reset vectors come from rank 0, so replicas keep one codebook.

    Args:
        cfg: quantizer config (codebook_size, dim, vq_decay, vq_epsilon, vq_beta, vq_reset_threshold,
            vq_objective).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        if not 0.0 <= cfg.vq_decay < 1.0:
            raise UserError(f"quantizer.vq_decay must be in [0, 1), got {cfg.vq_decay}")
        if cfg.vq_epsilon < 0 or cfg.vq_beta < 0 or cfg.vq_reset_threshold < 0:
            raise UserError("quantizer.vq_epsilon, quantizer.vq_beta and quantizer.vq_reset_threshold "
                            "must be >= 0")
        if cfg.vq_objective not in VQ_COMMITMENT:
            raise UserError(f"quantizer.vq_objective must be one of {', '.join(VQ_COMMITMENT)}, "
                            f"got '{cfg.vq_objective}'")
        self.decay, self.epsilon, self.beta = cfg.vq_decay, cfg.vq_epsilon, cfg.vq_beta
        self._commitment = VQ_COMMITMENT[cfg.vq_objective]
        self.reset_threshold = cfg.vq_reset_threshold
        bound = 1.0 / cfg.codebook_size
        codebook = torch.empty(cfg.codebook_size, cfg.dim).uniform_(-bound, bound)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.zeros(cfg.codebook_size))
        self.register_buffer("ema_weight", codebook.clone())

    def _quantize(self, z, var_logits, valid, temperature):
        batch, n, dim = z.shape
        flat = z.reshape(batch * n, dim)
        codebook = self.codebook.to(z.dtype)
        codes = weighted_sq_distance(flat.detach(), codebook).argmin(-1)  # (B * N,)
        e = F.embedding(codes, codebook).view(batch, n, dim)
        codes = codes.view(batch, n)
        commit = self._commitment(torch.where(valid, (z - e).square().sum(-1), 0.0), valid, dim)
        if self.training:
            with torch.no_grad():
                self._ema_update(flat[valid.reshape(-1)], codes[valid])
        z_q = z + (e - z).detach()                                 # straight-through
        perplexity, used = code_usage(codes, valid, self.codebook_size)
        return z_q, codes, {"commitment": self.beta * commit}, {"perplexity": perplexity, "used_codes": used}

    def _ema_update(self, z: Tensor, codes: Tensor) -> None:
        """EMA codebook update from valid encoder outputs z (M, D) and their codes (M,)."""
        onehot = F.one_hot(codes, self.codebook_size).to(z.dtype)  # (M, K)
        counts, sums = _all_reduce_sum(onehot.sum(0)), _all_reduce_sum(onehot.t() @ z)  # (K,), (K, D)
        count = self.decay * self.ema_count + (1 - self.decay) * counts.to(self.ema_count)
        total = count.sum()
        self.ema_count.copy_((count + self.epsilon) / (total + self.codebook_size * self.epsilon) * total)
        self.ema_weight.mul_(self.decay).add_((1 - self.decay) * sums.to(self.ema_weight))
        self.codebook.copy_(self.ema_weight / self.ema_count.unsqueeze(-1))
        if self.reset_threshold > 0 and z.shape[0] > 0:
            self._reset_dead_codes(z)

    def _reset_dead_codes(self, z: Tensor) -> None:
        dead = self.ema_count < self.reset_threshold               # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        picks = torch.randint(0, z.shape[0], (n_dead,), device=z.device)
        fresh = _broadcast_from_rank0(z[picks].to(self.codebook))  # (n_dead, D)
        self.codebook[dead] = fresh
        self.ema_weight[dead] = fresh * self.reset_threshold
        self.ema_count[dead] = self.reset_threshold


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(x: Tensor) -> Tensor:
    if _distributed():
        torch.distributed.all_reduce(x)
    return x


def _broadcast_from_rank0(x: Tensor) -> Tensor:
    if _distributed():
        torch.distributed.broadcast(x, src=0)
    return x


QUANTIZERS: dict[str, type[Quantizer]] = {
    "gaussian": GaussianSQ, "fixed_gaussian": FixedGaussianSQ, "vq_ema": VQEMA, "vmf": VmfSQ}


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    """The quantizer named by cfg.kind (a UserError lists the valid kinds)."""
    if cfg.kind not in QUANTIZERS:
        raise UserError(f"unknown quantizer.kind '{cfg.kind}' (valid: {', '.join(QUANTIZERS)})")
    return QUANTIZERS[cfg.kind](cfg)
