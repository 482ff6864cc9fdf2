"""Decoder likelihoods p(x | Z_q): each returns named loss terms and detached statistics.

Gaussian with MLE sigma (the reference default, Lin et al. 2021): the reconstruction term becomes
(D/2) log(MSE), D = elements per sample; with a learned sigma it is SSE/(2 sigma^2) + (D/2) log sigma^2.
The textbook VQ-VAE objective (quantizer.vq_objective = textbook) scores with the plain MSE instead.
Masks (True = valid) restrict every sum to real (unpadded) elements.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from sqaudio.config import ModelConfig, QuantizerConfig
from sqaudio.distributed import sum_all
from sqaudio.errors import UserError


def _masked_error(x_hat: Tensor, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of squared errors, valid elements and samples, over all ranks. mask broadcasts over x (B, 1, T)."""
    err = (x_hat.float() - x.float()) ** 2
    if mask is None:
        count = err.new_full((), float(err.numel()))  # a fill on the device, not a blocking host copy
    else:
        mask = mask.to(err.dtype).expand_as(err)
        err, count = err * mask, mask.sum()
    batch = err.new_full((), float(x.shape[0]))
    return sum_all(err.sum()), sum_all(count), sum_all(batch)


class GaussianMLE(nn.Module):
    """N(x_hat, sigma^2 I) with sigma^2 replaced by the batch MSE: loss = (D/2) log(MSE)."""

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None):
        sse, count, batch = _masked_error(x_hat, x, mask)
        mse = sse / count
        dims = count / batch  # D: valid elements per sample
        return {"reconstruction": 0.5 * dims * torch.log(mse)}, {"mse": mse.detach()}


class MeanSquared(nn.Module):
    """The textbook VQ-VAE reconstruction term: the mean squared error over valid elements (van den Oord et al.)."""

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None):
        sse, count, _ = _masked_error(x_hat, x, mask)
        mse = sse / count
        return {"reconstruction": mse}, {"mse": mse.detach()}


class GaussianLearned(nn.Module):
    """N(x_hat, sigma^2 I) with a learned log sigma^2.

    Args:
        log_var_init: initial log sigma^2.
    """

    def __init__(self, log_var_init: float):
        super().__init__()
        self.log_var_x = nn.Parameter(torch.tensor(float(log_var_init)))

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None):
        sse, count, batch = _masked_error(x_hat, x, mask)
        loss = sse / batch / (2 * self.log_var_x.exp()) + 0.5 * (count / batch) * self.log_var_x
        return {"reconstruction": loss}, {"mse": (sse / count).detach(), "var_x": self.log_var_x.exp().detach()}


def _vmf(cfg: ModelConfig) -> nn.Module:
    from sqaudio.models.vmf import VmfLikelihood

    return VmfLikelihood(cfg.vision.num_classes, cfg.kappa_inv_init)


LIKELIHOODS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "gaussian_mle": lambda cfg: GaussianMLE(), "gaussian_learned": lambda cfg: GaussianLearned(cfg.log_var_x_init),
    "vmf": _vmf}


def build_likelihood(cfg: ModelConfig, quantizer: QuantizerConfig | None = None) -> nn.Module:
    """The likelihood named by `cfg.likelihood` (registry); a textbook VQ-VAE quantizer takes the plain MSE."""
    if quantizer is not None and quantizer.kind == "vq_ema" and quantizer.vq_objective == "textbook":
        if cfg.likelihood == "vmf":
            raise UserError("quantizer.vq_objective=textbook is a mean-squared-error objective; "
                            "class maps (model.likelihood=vmf) need vq_objective=mle_sigma")
        return MeanSquared()
    if cfg.likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood '{cfg.likelihood}' (valid: {', '.join(LIKELIHOODS)})")
    return LIKELIHOODS[cfg.likelihood](cfg)
