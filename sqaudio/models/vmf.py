"""The vMF decoder likelihood of the vMF SQ-VAE (class maps), its Bessel log-normaliser and mIoU.

Each pixel's class c is scored as a unit vector e_c on the sphere S^{p-1} (p = decoder output channels)
under a von Mises-Fisher distribution with mean direction mu = normalize(decoder logits) and a learned
concentration kappa = 1 / (exp(log_kappa_inv) + 1e-9):

    log p(e_c) = kappa * mu_c + log C_p(kappa),   C_p(kappa) = kappa^(p/2-1) / ((2 pi)^(p/2) I_(p/2-1)(kappa))

As in sony/sqvae (vision/model.py) the constant -(p/2) log(2 pi) is left out. log I_v(k) is evaluated in torch,
in float64 on kappa's device (no host transfer), differentiable by autograd: the power series summed in log
space for k <= k_s(v) and the Hankel large-k expansion beyond, with k_s and both term counts chosen per order v
so that either side is accurate to about float64 resolution.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TOL = 1e-17         # relative size of the first term left out of either expansion
_MAX_TERM = 1.0      # largest Hankel term at k_s: bounds the rounding error of its alternating sum by ~eps
_MIN_SWITCH = 20.0   # the Hankel expansion leaves out a term e^(-2k) relative: 4e-18 at k = 20


@dataclasses.dataclass(frozen=True)
class BesselPlan:
    """How log I_v(k) is evaluated for one order v: series (terms m < series_terms) for k <= switch, else
    Hankel with hankel_terms terms."""

    switch: float
    series_terms: int
    hankel_terms: int


def _hankel_log_coefficients(v: float, count: int) -> list[float]:
    """log |a_j(v)| for j = 1..count, a_j = prod_{i<=j} (4v^2 - (2i-1)^2) / (8i) (-inf once a factor is 0)."""
    out, total = [], 0.0
    for i in range(1, count + 1):
        factor = abs(4 * v * v - (2 * i - 1) ** 2)
        total = -math.inf if factor == 0 or total == -math.inf else total + math.log(factor / (8 * i))
        out.append(total)
    return out


@functools.lru_cache(maxsize=None)
def bessel_plan(v: float) -> BesselPlan:
    """The switch point and term counts for order v >= 0 (pure Python, cached).

    Hankel with J terms at k >= switch: every kept term |a_j| / k^j <= _MAX_TERM and the first omitted one
    <= _TOL (a bound on the remainder for J + 1 >= v - 1/2); J minimises the switch. The series then keeps
    every term down to _TOL of its largest at k = switch, where its tail is widest.
    """
    first = max(1, math.ceil(v - 1.5))
    logs = _hankel_log_coefficients(v, first + 65)
    widest = max([_MIN_SWITCH] + [math.exp((c - math.log(_MAX_TERM)) / j) for j, c in enumerate(logs[:first - 1], 1)])
    best = (math.inf, first)
    for terms in range(first, first + 64):
        widest = max(widest, math.exp((logs[terms - 1] - math.log(_MAX_TERM)) / terms))
        omitted = math.exp((logs[terms] - math.log(_TOL)) / (terms + 1))
        best = min(best, (max(widest, omitted), terms))
    switch, hankel_terms = best
    half = math.log(switch / 2)
    m, top = 0, -math.inf
    while True:
        term = 2 * m * half - math.lgamma(m + 1) - math.lgamma(m + v + 1)
        top = max(top, term)
        if term < top + math.log(_TOL / 2) and (switch / 2) ** 2 <= (m + 1) * (m + v + 1) / 2:
            break  # past the peak, below _TOL / 2 and a tail ratio <= 1/2: the rest sums to < _TOL / 2
        m += 1
    return BesselPlan(switch, m + 1, hankel_terms)


def _series(v: float, k: Tensor, plan: BesselPlan) -> Tensor:
    """log I_v(k) - v log k from sum_m (k/2)^(2m+v) / (m! Gamma(m+v+1)), in log space."""
    m = torch.arange(plan.series_terms, dtype=k.dtype, device=k.device)
    logs = (2 * m) * torch.log(k / 2).unsqueeze(-1) - (torch.lgamma(m + 1) + torch.lgamma(m + (v + 1)))
    top, at = logs.max(-1, keepdim=True)
    rest = torch.exp(logs - top).scatter(-1, at, 0.0).sum(-1)  # all terms but the largest, relative to it
    return top.squeeze(-1) + torch.log1p(rest) - v * math.log(2.0)


def _hankel(v: float, k: Tensor, plan: BesselPlan) -> Tensor:
    """log I_v(k) - v log k from e^k / sqrt(2 pi k) * (1 + sum_j (-1)^j a_j(v) / k^j), in powers of switch / k."""
    i = torch.arange(1, plan.hankel_terms + 1, dtype=k.dtype, device=k.device)
    scaled = torch.cumprod(((2 * i - 1) ** 2 - 4 * v * v) / (8 * plan.switch * i), 0)  # (-1)^j a_j / switch^j
    correction = (scaled * (plan.switch / k).unsqueeze(-1) ** i).sum(-1)
    return k - 0.5 * torch.log(2 * math.pi * k) - v * torch.log(k) + torch.log1p(correction)


def _log_iv_over_power(v: float, k: Tensor) -> Tensor:
    """log(I_v(k) / k^v) in float64 for k > 0 (finite as k -> 0), by series or Hankel (both kept finite)."""
    k = k.double()
    plan = bessel_plan(float(v))
    series = k <= plan.switch          # each side gets k where it is used and the switch point elsewhere
    small = _series(v, torch.where(series, k, plan.switch).clamp_min(torch.finfo(k.dtype).tiny), plan)
    large = _hankel(v, torch.where(series, plan.switch, k), plan)
    return torch.where(series, small, large)


def log_iv(v: float, k: Tensor) -> Tensor:
    """log I_v(k), the modified Bessel function of the first kind of real order v >= 0, for k > 0 (float64)."""
    return _log_iv_over_power(v, k) + v * torch.log(k.double())


def ive(v: float, k: Tensor) -> Tensor:
    """Exponentially scaled I_v(k) exp(-k) (float64), differentiable in `k`."""
    return torch.exp(log_iv(v, k) - k.double())


def log_normalizer(kappa: Tensor, p: int) -> Tensor:
    """log C_p(kappa) + (p/2) log(2 pi) for a vMF on S^{p-1}; computed in float64, returned in kappa's dtype."""
    return (-_log_iv_over_power(p / 2 - 1, kappa)).to(kappa.dtype)


class VmfLikelihood(nn.Module):
    """vMF decoder likelihood over one-hot classes with a learned concentration (the reference's VmfSQVAE loss).

    forward(x_hat (B, C, H, W) raw decoder outputs, x long (B, H, W) classes, mask (B, H, W) bool or None)
    -> ({"reconstruction": -sum over valid pixels of log p, averaged over the batch},
        {"accuracy": pixel accuracy of argmax over valid pixels, "kappa": current kappa}).

    Args:
        num_classes: number of classes (the decoder may output more channels; the vMF lives on all of them).
        kappa_inv_init: initial log(1 / kappa) (reference: log 0.01).
    """

    def __init__(self, num_classes: int, kappa_inv_init: float):
        super().__init__()
        self.num_classes = num_classes
        self.log_kappa_inv = nn.Parameter(torch.tensor(float(kappa_inv_init)))

    @property
    def kappa(self) -> Tensor:
        return 1.0 / (self.log_kappa_inv.exp() + 1e-9)

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None):
        if x_hat.shape[1] < self.num_classes:
            raise ValueError(f"decoder gives {x_hat.shape[1]} channels for {self.num_classes} classes")
        mu = F.normalize(x_hat.float(), p=2.0, dim=1)  # (B, C, H, W) unit mean directions
        cosine = mu.gather(1, x.long().unsqueeze(1)).squeeze(1)  # (B, H, W) = <mu, e_x>
        valid = torch.ones_like(cosine) if mask is None else mask.to(cosine.dtype).expand_as(cosine)
        kappa = self.kappa
        log_c = log_normalizer(kappa, x_hat.shape[1])
        batch = x.shape[0]
        nll = -(kappa * (cosine * valid).sum() + log_c * valid.sum()) / batch
        correct = (mu.argmax(dim=1) == x).to(valid.dtype) * valid
        accuracy = correct.sum() / valid.sum().clamp(min=1)
        return {"reconstruction": nll}, {"accuracy": accuracy.detach(), "kappa": kappa.detach()}


def predict(x_hat: Tensor, num_classes: int) -> Tensor:
    """Decoder outputs (B, C, H, W) -> predicted class map (B, H, W) over the first `num_classes` channels."""
    return x_hat[:, :num_classes].argmax(dim=1)


def iou_counts(pred: Tensor, target: Tensor, num_classes: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-class intersection and union pixel counts (num_classes,) of two class maps (B, H, W).

    Sum them over batches and call `miou_from_counts` for a dataset-level mIoU.
    """
    if mask is not None:
        keep = mask.bool().expand_as(target)
        pred, target = pred[keep], target[keep]
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    pred_area = torch.bincount(pred, minlength=num_classes)[:num_classes]
    target_area = torch.bincount(target, minlength=num_classes)[:num_classes]
    inter = torch.bincount(target[pred == target], minlength=num_classes)[:num_classes]
    return inter, pred_area + target_area - inter


def miou_from_counts(inter: Tensor, union: Tensor) -> Tensor:
    """Mean IoU over the classes that occur (union > 0) in prediction or target."""
    present = union > 0
    if not present.any():
        return torch.tensor(float("nan"))
    return (inter[present].double() / union[present].double()).mean()


def miou(pred: Tensor, target: Tensor, num_classes: int, mask: Tensor | None = None) -> Tensor:
    """Mean intersection-over-union of class maps. pred: (B, H, W) classes or (B, C, H, W) scores; target (B, H, W)."""
    if pred.dim() == target.dim() + 1:
        pred = predict(pred, num_classes)
    return miou_from_counts(*iou_counts(pred, target, num_classes, mask))
