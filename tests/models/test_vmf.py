"""The vMF log-normaliser's Bessel function in torch: values and gradients against scipy over k from 1e-6 to 1e6,
finite at the extremes, and no host transfer (it runs on the meta device, which has no values)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch

from sqaudio.models.vmf import VmfLikelihood, bessel_plan, log_iv, log_normalizer

ORDERS_P = [3, 10, 19, 20, 64]


def grid(p: int) -> np.ndarray:
    """k from 1e-6 to 1e6, with points just around the series/Hankel switch of order p/2 - 1."""
    switch = bessel_plan(p / 2 - 1).switch
    return np.concatenate([np.logspace(-6, 6, 49), switch * np.array([1 - 1e-9, 1.0, 1 + 1e-9])])


@pytest.mark.parametrize("p", ORDERS_P)
def test_log_normalizer_matches_scipy(p):
    v, k = p / 2 - 1, grid(p)
    want = v * np.log(k) - (np.log(scipy.special.ive(v, k)) + k)   # log C_p(k) + (p/2) log(2 pi)
    got = log_normalizer(torch.tensor(k, dtype=torch.float64), p).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("p", ORDERS_P)
def test_log_iv_gradient_is_the_bessel_ratio(p):
    """d/dk log I_v(k) = I_v'(k) / I_v(k) = I_{v+1}(k) / I_v(k) + v / k (from I_v' = I_{v+1} + (v/k) I_v)."""
    v, k = p / 2 - 1, grid(p)
    kt = torch.tensor(k, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_iv(v, kt).sum(), kt)
    want = scipy.special.ive(v + 1, k) / scipy.special.ive(v, k) + v / k
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [2, 3, 20, 64, 200])
def test_extreme_concentrations_stay_finite(p):
    """Tiny and huge k (kappa = 1 / (exp(s) + 1e-9) reaches 1e9) give finite values and gradients on both sides."""
    k = torch.tensor([1e-300, 1e-12, 1e9, 1e15], dtype=torch.float64, requires_grad=True)
    value = log_normalizer(k, p)
    (grad,) = torch.autograd.grad(value.sum(), k)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    v = p / 2 - 1
    assert value[1].item() == pytest.approx(v * np.log(2) + scipy.special.gammaln(v + 1), rel=1e-12)  # k -> 0
    assert grad[3].item() == pytest.approx(-1.0, abs=1e-12)                                              # ~ -k


def test_likelihood_reads_no_value_on_the_host():
    """On the meta device every tensor value is unknown: a host transfer or scipy call would fail here."""
    lik = VmfLikelihood(19, np.log(0.05)).to("meta")
    logits = torch.empty(2, 20, 3, 3, device="meta", requires_grad=True)
    labels = torch.empty(2, 3, 3, dtype=torch.long, device="meta")
    losses, stats = lik(logits, labels)
    losses["reconstruction"].backward()
    assert losses["reconstruction"].device.type == "meta" and lik.log_kappa_inv.grad.shape == ()
