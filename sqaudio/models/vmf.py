"""The vMF decoder likelihood of the vMF SQ-VAE (class maps), its Bessel log-normaliser and mIoU.

Each pixel's class c is scored as a unit vector e_c on the sphere S^{p-1} (p = decoder output channels)
under a von Mises-Fisher distribution with mean direction mu = normalize(decoder logits) and a learned
concentration kappa = 1 / (exp(log_kappa_inv) + 1e-9):

    log p(e_c) = kappa * mu_c + log C_p(kappa),   C_p(kappa) = kappa^(p/2-1) / ((2 pi)^(p/2) I_(p/2-1)(kappa))

As in sony/sqvae (vision/model.py) the constant -(p/2) log(2 pi) is left out. I_v is evaluated through the
exponentially scaled `scipy.special.ive` (log I_v(k) = log ive(v, k) + k) with an autograd rule for k.
"""
from __future__ import annotations

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _scipy_ive(v: float, k: Tensor) -> Tensor:
    out = scipy.special.ive(v, k.detach().cpu().double().numpy())
    return torch.as_tensor(np.asarray(out), dtype=k.dtype, device=k.device)


class Ive(torch.autograd.Function):
    """ive(v, k) = I_v(k) exp(-k) for a fixed real order v; differentiable in k (k > 0).

    d/dk ive(v, k) = ive(v - 1, k) - ive(v, k) (v + k) / k.
    """

    @staticmethod
    def forward(ctx, v: float, k: Tensor) -> Tensor:
        ctx.v = float(v)
        ctx.save_for_backward(k)
        return _scipy_ive(ctx.v, k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (k,) = ctx.saved_tensors
        v = ctx.v
        slope = _scipy_ive(v - 1, k) - _scipy_ive(v, k) * (v + k) / k
        return None, grad * slope


def ive(v: float, k: Tensor) -> Tensor:
    """Exponentially scaled modified Bessel function of the first kind, differentiable in `k`."""
    return Ive.apply(float(v), k)


def log_normalizer(kappa: Tensor, p: int) -> Tensor:
    """log C_p(kappa) + (p/2) log(2 pi) for a vMF on S^{p-1}; computed in float64, returned in kappa's dtype."""
    k = kappa.double()
    v = p / 2 - 1
    return (v * torch.log(k) - k - torch.log(ive(v, k))).to(kappa.dtype)


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
