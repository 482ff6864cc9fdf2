"""The VQ-VAE quantizer with an EMA codebook (the SQ-VAE papers' baseline)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sqaudio.config import QuantizerConfig
from sqaudio.distributed import broadcast, sum_all
from sqaudio.errors import UserError
from sqaudio.models.quantizers import Quantizer, code_counts, code_usage, weighted_sq_distance


# The VQ-VAE commitment ||z - sg(e)||^2 reduced per objective, from per-position squared errors (B, N):
# textbook (van den Oord et al.; bshall/ZeroSpeech): the mean over valid elements (positions x dims), next to
# the plain MSE; mle_sigma: each sample's sum, averaged over the batch, next to (D/2) log MSE.
def _commit_mean(squared_error: Tensor, valid: Tensor, dim: int) -> Tensor:
    return squared_error.sum() / (valid.sum().clamp_min(1) * dim)


def _commit_sum(squared_error: Tensor, valid: Tensor, dim: int) -> Tensor:
    return squared_error.sum() / squared_error.shape[0]


VQ_COMMITMENT: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {"textbook": _commit_mean, "mle_sigma": _commit_sum}


class VQEMA(Quantizer):
    """VQ-VAE quantizer with an EMA codebook (bshall/ZeroSpeech style) and optional dead-code reset.

    The commitment beta * ||z - sg(e)||^2 is a mean over elements (vq_objective textbook) or a per-sample
    sum (mle_sigma); `sqaudio.models.likelihoods.build_likelihood` pairs the first with the plain MSE.

    Codebook starts uniform in +-1/K. In training mode each forward updates, from valid positions only:
    N_k <- decay N_k + (1 - decay) n_k (then Laplace-smoothed with epsilon), m_k <- decay m_k + (1 - decay)
    sum z, e_k = m_k / N_k. With vq_reset_threshold > 0, codes whose N_k falls below it are set to random
    valid encoder outputs of the batch (N_k = threshold); a batch without valid positions resets nothing.
    Under torch.distributed the counts and sums are all-reduced and reset vectors come from rank 0, so
    replicas keep one codebook. The update reads no tensor value on the host: padding enters as zero weights
    and the reset draws one candidate per code and applies it where the code is dead (fixed shapes).

    Args:
        cfg: quantizer config (codebook_size, dim, vq_decay, vq_epsilon, vq_beta, vq_reset_threshold,
            vq_objective).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg.codebook_size, cfg.dim)
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
        batch, positions, dim = z.shape
        flat = z.reshape(batch * positions, dim)
        codebook = self.codebook.to(z.dtype)
        codes = weighted_sq_distance(flat.detach(), codebook).argmin(-1)  # (B * N,)
        nearest = F.embedding(codes, codebook).view(batch, positions, dim)
        codes = codes.view(batch, positions)
        commit = self._commitment(torch.where(valid, (z - nearest).square().sum(-1), 0.0), valid, dim)
        counts = sum_all(code_counts(codes, valid, self.codebook_size))  # (K,) uses in the global batch
        if self.training:
            with torch.no_grad():
                self._ema_update(flat, codes.reshape(-1), valid.reshape(-1), counts)
        z_q = z + (nearest - z).detach()                           # straight-through
        perplexity, used = code_usage(counts)
        return z_q, codes, {"commitment": self.beta * commit}, {"perplexity": perplexity, "used_codes": used}

    def _ema_update(self, z: Tensor, codes: Tensor, valid: Tensor, counts: Tensor) -> None:
        """EMA codebook update from encoder outputs z (M, D), their codes (M,), validity (M,) bool and the global
        batch's code counts (K,) (`code_counts` summed over the ranks)."""
        weights = z.new_zeros(z.shape[0], self.codebook_size)      # (M, K): one-hot rows, 0 where padded
        weights.scatter_(1, codes.unsqueeze(1), valid.to(z.dtype).unsqueeze(1))
        sums = sum_all(weights.t() @ z)                            # (K, D)
        count = self.decay * self.ema_count + (1 - self.decay) * counts.to(self.ema_count)
        total = count.sum()
        self.ema_count.copy_((count + self.epsilon) / (total + self.codebook_size * self.epsilon) * total)
        self.ema_weight.mul_(self.decay).add_((1 - self.decay) * sums.to(self.ema_weight))
        self.codebook.copy_(self.ema_weight / self.ema_count.unsqueeze(-1))
        if self.reset_threshold > 0 and z.shape[0] > 0:
            self._reset_dead_codes(z, valid)

    def _reset_dead_codes(self, z: Tensor, valid: Tensor) -> None:
        """Codes with N_k < threshold take a uniformly drawn valid row of z (rank 0's draw) and N_k = threshold."""
        seen = valid.long().cumsum(0)                              # (M,) valid rows up to each row
        n_valid = seen[-1]
        nth = (torch.rand(self.codebook_size, dtype=torch.float64, device=z.device) * n_valid).long()
        nth = torch.minimum(nth, n_valid - 1)                      # (K,) which valid row, 0 .. n_valid - 1
        picks = torch.searchsorted(seen, nth, right=True)          # (K,) its row in z (row 0 if none is valid)
        picked_valid = valid.index_select(0, picks).to(z.dtype).unsqueeze(1)
        candidates = torch.cat([z.index_select(0, picks), picked_valid], 1)
        candidates = broadcast(candidates.to(self.codebook))       # (K, D + 1): rows and validity from rank 0
        fresh, ok = candidates[:, :-1], candidates[:, -1] > 0      # ok: False only without valid positions
        reset = (self.ema_count < self.reset_threshold) & ok
        self.codebook.copy_(torch.where(reset.unsqueeze(1), fresh, self.codebook))
        self.ema_weight.copy_(torch.where(reset.unsqueeze(1), fresh * self.reset_threshold, self.ema_weight))
        self.ema_count.copy_(torch.where(reset, self.reset_threshold, self.ema_count))
