"""The reference ResNet encoder/decoder for 28, 32 and 64 px images and class maps (one shape for all sizes).

Encoder: `n_downsample` stride-2 k4 convs (in -> C/2 -> C -> C ...), a k3 conv, `n_resblocks - 1` shared
residual blocks, then a residual-block head for the latent mean and (when the quantizer needs variance
channels) a second head for the log-variances, as in sony/sqvae vision/networks. The decoder mirrors it with
transposed convs. Sizes come from `VisionModelConfig` only: nothing here knows which dataset it serves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqaudio.config import VisionModelConfig
from sqaudio.errors import UserError

OUTPUT_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "none": nn.Identity}


class ResBlock(nn.Module):
    """x + BN(conv1x1(ReLU(BN(conv3x3(ReLU(x)))))), the reference residual block.

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels),
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _check(cfg: VisionModelConfig) -> None:
    if cfg.n_downsample < 1 or cfg.n_resblocks < 1 or cfg.channels < 2:
        raise UserError("model.vision needs n_downsample >= 1, n_resblocks >= 1 and channels >= 2 "
                        f"(got {cfg.n_downsample}, {cfg.n_resblocks}, {cfg.channels})")
    if cfg.image_size % 2 ** cfg.n_downsample:
        raise UserError(f"model.vision.image_size {cfg.image_size} is not divisible by 2**n_downsample "
                        f"= {2 ** cfg.n_downsample}")
    if cfg.output_activation != "auto" and cfg.output_activation not in OUTPUT_ACTIVATIONS:
        raise UserError(f"unknown model.vision.output_activation '{cfg.output_activation}' "
                        f"(valid: auto, {', '.join(OUTPUT_ACTIVATIONS)})")


def _widths(cfg: VisionModelConfig, outer: int) -> list[int]:
    """Channel counts along the resolution ladder, full resolution first: [outer, C/2, C, C, ...]."""
    return [outer, cfg.channels // 2] + [cfg.channels] * (cfg.n_downsample - 1)


def _head(channels: int, out: int) -> nn.Module:
    """A residual block, then a 1x1 projection when the output width differs (the reference has none)."""
    proj = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)
    return nn.Sequential(ResBlock(channels), proj)


def init_weights(module: nn.Module) -> None:
    """The reference initialisation: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class VisionEncoder(nn.Module):
    """Images (B, C, H, W) in [0, 1] (or class maps: long (B, H, W), one-hot encoded here) -> (B, out_channels, h, w).

    h = H / 2**n_downsample. The first `out_channels - var_channels` channels are the latent mean; the last
    `var_channels` come from a separate head (the reference's log-variance branch for SQ-VAE II-IV).

    Args:
        cfg: sizes (image_size, in_channels or num_classes, channels, n_resblocks, n_downsample).
        out_channels: total output channels (quantizer dim + the quantizer's variance channels).
        var_channels: how many of them a separate variance head produces (0: one head for all).
    """

    def __init__(self, cfg: VisionModelConfig, out_channels: int, var_channels: int = 0):
        super().__init__()
        _check(cfg)
        if not 0 <= var_channels < out_channels:
            raise ValueError(f"var_channels must be in [0, out_channels), got {var_channels} of {out_channels}")
        self.cfg = cfg
        c = cfg.channels
        self.in_channels = cfg.num_classes or cfg.in_channels
        widths = _widths(cfg, self.in_channels)
        layers: list[nn.Module] = []
        for i in range(cfg.n_downsample):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1))
            layers += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        layers.append(nn.Conv2d(c, c, 3, 1, 1))
        layers += [ResBlock(c) for _ in range(cfg.n_resblocks - 1)]
        self.trunk = nn.Sequential(*layers)
        self.mean_head = _head(c, out_channels - var_channels)
        self.var_head = _head(c, var_channels) if var_channels else None
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():  # class map (B, H, W) -> one-hot (B, K, H, W)
            x = F.one_hot(x.long(), self.cfg.num_classes).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise UserError(f"images are {x.shape[-2]}x{x.shape[-1]} but model.vision.image_size is "
                            f"{self.cfg.image_size}")
        if x.shape[1] != self.in_channels:
            raise UserError(f"images have {x.shape[1]} channels but the model expects {self.in_channels} "
                            "(model.vision.in_channels, or num_classes for class maps)")
        h = self.trunk(x)  # (B, C, h, w)
        mean = self.mean_head(h)
        return mean if self.var_head is None else torch.cat([mean, self.var_head(h)], dim=1)


class VisionDecoder(nn.Module):
    """Quantized latents (B, in_channels, h, w) -> (B, out_channels, H, W), H = h * 2**n_downsample.

    Output activation `cfg.output_activation`; "auto" is a sigmoid for images (num_classes == 0) and raw,
    unnormalised outputs for class maps (the vMF likelihood normalises them).

    Args:
        cfg: sizes (channels, n_resblocks, n_downsample, output_activation, num_classes).
        in_channels: latent channels (quantizer dim); a 1x1 conv maps them to cfg.channels when they differ.
        out_channels: image channels, or the number of classes for class maps.
    """

    def __init__(self, cfg: VisionModelConfig, in_channels: int, out_channels: int):
        super().__init__()
        _check(cfg)
        c = cfg.channels
        widths = _widths(cfg, out_channels)[::-1]  # (..., C, C/2, out)
        layers: list[nn.Module] = [nn.Identity() if in_channels == c else nn.Conv2d(in_channels, c, 1)]
        layers += [ResBlock(c) for _ in range(cfg.n_resblocks)]
        layers += [nn.ConvTranspose2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU()]
        for i in range(cfg.n_downsample):
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1))
            if i < cfg.n_downsample - 1:
                layers += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        activation = cfg.output_activation
        if activation == "auto":
            activation = "none" if cfg.num_classes else "sigmoid"
        layers.append(OUTPUT_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
