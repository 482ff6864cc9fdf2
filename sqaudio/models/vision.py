"""The reference ResNet encoders/decoders for images and class maps, one layer sequence per dataset.

sony/sqvae (vision/networks/net_28.py, net_32.py, net_64.py) has four networks; `NETWORKS` describes each as
data (its conv stem, its transposed-conv stack, how many residual blocks the decoder has), and one
`VisionEncoder` / `VisionDecoder` builds any of them. With `channels == quantizer.dim` (every shipped recipe,
and the only case in the reference, whose width is the code dimension) the parameter shapes and their order
equal the reference's. Other widths add a 1x1 projection at the latent side.

Encoder: stem convs (BatchNorm+ReLU between them, and after the last where the reference has it),
`n_resblocks - 1` residual blocks, then a residual-block head for the latent mean and, for SQ-VAE II-IV, a
second head for the log-variances. Decoder: residual blocks, transposed convs with BatchNorm+ReLU between
them, output activation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqaudio.config import VisionModelConfig
from sqaudio.errors import UserError

OUTPUT_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "none": nn.Identity}


@dataclass(frozen=True)
class Conv:
    """One (transposed) conv of a stem: kernel, stride and output width ("half" = C/2, "full" = C, "out")."""

    kernel: int
    stride: int
    width: str


@dataclass(frozen=True)
class NetworkSpec:
    """A reference network: encoder stem, decoder stack (last conv -> image/class channels), block counts.

    Args:
        image_size: the side the reference network is built for.
        encoder: stem convs from the input channels.
        encoder_act_last: BatchNorm+ReLU after the last stem conv too.
        decoder: transposed convs after the residual blocks; the last has width "out".
        decoder_block_offset: the decoder has `n_resblocks - decoder_block_offset` residual blocks.
    """

    image_size: int
    encoder: tuple[Conv, ...]
    encoder_act_last: bool
    decoder: tuple[Conv, ...]
    decoder_block_offset: int

    @property
    def downsample(self) -> int:
        return math.prod(c.stride for c in self.encoder)


_DOWN, _UP = Conv(4, 2, "half"), Conv(4, 2, "out")
NETWORKS: dict[str, NetworkSpec] = {
    # MNIST, Fashion-MNIST (net_28): no conv or BatchNorm after the second stride-2 conv
    "resnet28": NetworkSpec(28, (_DOWN, Conv(4, 2, "full")), False, (Conv(4, 2, "half"), _UP), 0),
    # CIFAR10 (net_32): a k3 conv with BatchNorm+ReLU closes the stem
    "resnet32": NetworkSpec(32, (_DOWN, Conv(4, 2, "full"), Conv(3, 1, "full")), True,
                            (Conv(3, 1, "full"), Conv(4, 2, "half"), _UP), 0),
    # CelebA (net_64): the k3 conv without BatchNorm+ReLU; one residual block fewer in the decoder
    "resnet64": NetworkSpec(64, (_DOWN, Conv(4, 2, "full"), Conv(3, 1, "full")), False,
                            (Conv(3, 1, "full"), Conv(4, 2, "half"), _UP), 1),
    # CelebAMask-HQ (net_64 Label): three stride-2 convs (8x8 latents) on one-hot class maps
    "resnet64_label": NetworkSpec(64, (_DOWN, Conv(4, 2, "full"), Conv(4, 2, "full")), False,
                                  (Conv(4, 2, "full"), Conv(4, 2, "half"), _UP), 1),
}


def class_channels(num_classes: int) -> int:
    """One-hot input / vMF output channels for `num_classes` classes: rounded up to even, as the reference."""
    return 2 * math.ceil(num_classes / 2)


def network_spec(cfg: VisionModelConfig) -> NetworkSpec:
    """The `NetworkSpec` of cfg.network, checked against the config (a UserError lists the valid names)."""
    if cfg.network not in NETWORKS:
        raise UserError(f"unknown model.vision.network '{cfg.network}' (valid: {', '.join(NETWORKS)})")
    spec = NETWORKS[cfg.network]
    if cfg.n_resblocks < 1 or cfg.channels < 2:
        raise UserError(f"model.vision needs n_resblocks >= 1 and channels >= 2 "
                        f"(got {cfg.n_resblocks}, {cfg.channels})")
    if cfg.image_size % spec.downsample:
        raise UserError(f"model.vision.image_size {cfg.image_size} is not divisible by the {cfg.network} "
                        f"downsampling factor {spec.downsample}")
    if cfg.output_activation != "auto" and cfg.output_activation not in OUTPUT_ACTIVATIONS:
        raise UserError(f"unknown model.vision.output_activation '{cfg.output_activation}' "
                        f"(valid: auto, {', '.join(OUTPUT_ACTIVATIONS)})")
    return spec


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


def _stack(convs: tuple[Conv, ...], conv: type[nn.Module], c_in: int, widths: dict[str, int],
           act_last: bool) -> list[nn.Module]:
    """(Transposed) convs with BatchNorm+ReLU between them (and after the last when `act_last`)."""
    layers: list[nn.Module] = []
    for i, spec in enumerate(convs):
        c_out = widths[spec.width]
        layers.append(conv(c_in, c_out, spec.kernel, stride=spec.stride, padding=(spec.kernel - spec.stride) // 2))
        if act_last or i < len(convs) - 1:
            layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return layers


def _head(channels: int, out: int) -> nn.Module:
    """A residual block, then a 1x1 projection when the output width differs (never in the reference)."""
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

    h = H / downsampling factor of the network. The first `out_channels - var_channels` channels are the
    latent mean; the last `var_channels` come from a separate head (the log-variances of SQ-VAE II-IV).

    Args:
        cfg: network name and sizes (image_size, in_channels or num_classes, channels, n_resblocks).
        out_channels: total output channels (quantizer dim + the quantizer's variance channels).
        var_channels: how many of them a separate variance head produces (0: one head for all).
    """

    def __init__(self, cfg: VisionModelConfig, out_channels: int, var_channels: int = 0):
        super().__init__()
        spec = network_spec(cfg)
        if not 0 <= var_channels < out_channels:
            raise ValueError(f"var_channels must be in [0, out_channels), got {var_channels} of {out_channels}")
        self.cfg = cfg
        width = cfg.channels
        self.in_channels = class_channels(cfg.num_classes) if cfg.num_classes else cfg.in_channels
        layers = _stack(spec.encoder, nn.Conv2d, self.in_channels, {"half": width // 2, "full": width},
                        spec.encoder_act_last)
        layers += [ResBlock(width) for _ in range(cfg.n_resblocks - 1)]
        self.trunk = nn.Sequential(*layers)
        self.mean_head = _head(width, out_channels - var_channels)
        self.var_head = _head(width, var_channels) if var_channels else None
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():  # class map (B, H, W) -> one-hot (B, in_channels, H, W)
            x = F.one_hot(x.long(), self.in_channels).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise UserError(f"images are {x.shape[-2]}x{x.shape[-1]} but model.vision.image_size is "
                            f"{self.cfg.image_size}")
        if x.shape[1] != self.in_channels:
            raise UserError(f"images have {x.shape[1]} channels but the model expects {self.in_channels} "
                            "(model.vision.in_channels, or num_classes rounded up to even for class maps)")
        h = self.trunk(x)  # (B, C, h, w)
        mean = self.mean_head(h)
        return mean if self.var_head is None else torch.cat([mean, self.var_head(h)], dim=1)


class VisionDecoder(nn.Module):
    """Quantized latents (B, in_channels, h, w) -> (B, out_channels, H, W).

    Output activation `cfg.output_activation`; "auto" is a sigmoid for images (num_classes == 0) and raw,
    unnormalised outputs for class maps (the vMF likelihood normalises them).

    Args:
        cfg: network name and sizes (channels, n_resblocks, output_activation, num_classes).
        in_channels: latent channels (quantizer dim); a 1x1 conv maps them to cfg.channels when they differ.
        out_channels: image channels, or `class_channels(num_classes)` for class maps.
    """

    def __init__(self, cfg: VisionModelConfig, in_channels: int, out_channels: int):
        super().__init__()
        spec = network_spec(cfg)
        width = cfg.channels
        layers: list[nn.Module] = [nn.Identity() if in_channels == width else nn.Conv2d(in_channels, width, 1)]
        layers += [ResBlock(width) for _ in range(cfg.n_resblocks - spec.decoder_block_offset)]
        sizes = {"half": width // 2, "full": width, "out": out_channels}
        layers += _stack(spec.decoder, nn.ConvTranspose2d, width, sizes, False)
        activation = cfg.output_activation
        if activation == "auto":
            activation = "none" if cfg.num_classes else "sigmoid"
        layers.append(OUTPUT_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
