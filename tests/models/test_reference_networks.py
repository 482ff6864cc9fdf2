"""The image networks of the shipped recipes against the layer sequences of sony/sqvae (vision/networks/).

Read from the reference: net_28.py (MNIST, Fashion-MNIST), net_32.py (CIFAR10), net_64.py (CelebA, and its
Label variant for CelebAMask-HQ), util.py (ResBlock), configs/*.yaml (num_rb, dim_dict; vMF adds 1 to
dim_dict in main.py) and model.py (the network width is dim_dict; one-hot/vMF channels ceil(19 / 2) * 2 = 20).
Each expected sequence below lists every leaf layer in registration order, so the parameter shapes follow.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sqaudio.config import load_recipe
from sqaudio.models.sqvae import build_model

RELU, SIGMOID, SOFTPLUS = ("ReLU", []), ("Sigmoid", []), ("Softplus", [])


def conv(i, o, k, s):
    return (f"Conv2d({i}->{o} k{k} s{s})", [(o, i, k, k), (o,)])


def convt(i, o, k, s):
    return (f"ConvTranspose2d({i}->{o} k{k} s{s})", [(i, o, k, k), (o,)])


def bn(c):
    return (f"BatchNorm2d({c})", [(c,), (c,)])


def res(c, n=1):
    """util.ResBlock: ReLU, conv3x3, BN, ReLU, conv1x1, BN (n of them)."""
    return [RELU, conv(c, c, 3, 1), bn(c), RELU, conv(c, c, 1, 1), bn(c)] * n


def describe(module: nn.Module) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Leaf layers of `module` in order, as (name, parameter shapes); Identity layers skipped."""
    rows = []
    for m in module.modules():
        if list(m.children()) or isinstance(m, nn.Identity):
            continue
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            name = f"{type(m).__name__}({m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]})"
        elif isinstance(m, nn.BatchNorm2d):
            name = f"BatchNorm2d({m.num_features})"
        else:
            name = type(m).__name__
        rows.append((name, [tuple(p.shape) for p in m.parameters(recurse=False)]))
    return rows


# net_28: conv stem 1 -> 32 (BN, ReLU) -> 64; num_rb - 1 ResBlocks + res_m; decoder num_rb ResBlocks,
# convT 64 -> 32 (BN, ReLU) -> 1, sigmoid. num_rb 2, dim 64.
NET28 = ([conv(1, 32, 4, 2), bn(32), RELU, conv(32, 64, 4, 2)] + res(64, 2),
         res(64, 2) + [convt(64, 32, 4, 2), bn(32), RELU, convt(32, 1, 4, 2), SIGMOID])
# net_32: the stem ends with conv3x3 + BN + ReLU; decoder convT3x3 (BN, ReLU) first. num_rb 2, dim 64.
NET32 = ([conv(3, 32, 4, 2), bn(32), RELU, conv(32, 64, 4, 2), bn(64), RELU, conv(64, 64, 3, 1), bn(64), RELU]
         + res(64, 2),
         res(64, 2) + [convt(64, 64, 3, 1), bn(64), RELU, convt(64, 32, 4, 2), bn(32), RELU, convt(32, 3, 4, 2),
                       SIGMOID])
# net_64: the stem's conv3x3 has no BN/ReLU; the decoder has num_rb - 1 ResBlocks. num_rb 6, dim 64.
NET64 = ([conv(3, 32, 4, 2), bn(32), RELU, conv(32, 64, 4, 2), bn(64), RELU, conv(64, 64, 3, 1)] + res(64, 6),
         res(64, 5) + [convt(64, 64, 3, 1), bn(64), RELU, convt(64, 32, 4, 2), bn(32), RELU, convt(32, 3, 4, 2),
                       SIGMOID])
# net_64 Label: 20 one-hot channels, three stride-2 convs; decoder num_rb - 1 ResBlocks, three stride-2 convTs
# to 20 channels, softplus (act_decoder "exp"). num_rb 2, dim 64 + 1.
NET64_LABEL = ([conv(20, 32, 4, 2), bn(32), RELU, conv(32, 65, 4, 2), bn(65), RELU, conv(65, 65, 4, 2)] + res(65, 2),
               res(65, 1) + [convt(65, 65, 4, 2), bn(65), RELU, convt(65, 32, 4, 2), bn(32), RELU,
                             convt(32, 20, 4, 2), SOFTPLUS])

# recipe -> (encoder layers, decoder layers, encoder parameters, decoder parameters); the counts are the
# arithmetic of the layer lists (e.g. net_28 encoder: 544 + 64 + 32832 + 2 * 41344 = 116128)
CASES = {
    "mnist/sqvae_gauss1": (*NET28, 116_128, 116_065),
    "fashion_mnist/sqvae_gauss1": (*NET28, 116_128, 116_065),
    "cifar10/sqvae_gauss1": (*NET32, 154_336, 154_147),
    "celeba/sqvae_gauss1": (*NET64, 319_584, 278_179),
    "celebamask_hq/sqvae_vmf": (*NET64_LABEL, 196_756, 154_071),
}


def _count(layers) -> int:
    return sum(torch.Size(s).numel() for _, shapes in layers for s in shapes)


@pytest.mark.parametrize("name", list(CASES))
def test_layer_sequence_and_parameter_count_match_the_reference(name):
    enc_layers, dec_layers, enc_params, dec_params = CASES[name]
    assert (_count(enc_layers), _count(dec_layers)) == (enc_params, dec_params)  # the stated counts
    model = build_model(load_recipe(name))
    assert describe(model.encoder) == enc_layers
    assert describe(model.decoder) == dec_layers
    assert sum(p.numel() for p in model.encoder.parameters()) == enc_params
    assert sum(p.numel() for p in model.decoder.parameters()) == dec_params


@pytest.mark.parametrize("name", ["cifar10/sqvae_gauss2", "cifar10/sqvae_gauss4", "celeba/sqvae_gauss3"])
def test_variance_head_is_a_second_resblock_after_the_mean_head(name):
    """SQ-VAE II-IV: the reference adds res_v (a ResBlock of width dim) after res_m."""
    base = CASES[name.replace("gauss2", "gauss1").replace("gauss3", "gauss1").replace("gauss4", "gauss1")]
    model = build_model(load_recipe(name))
    assert describe(model.encoder) == base[0] + res(64)
    assert describe(model.decoder) == base[1]


@pytest.mark.parametrize("name,side", [("mnist/sqvae_gauss1", 7), ("cifar10/sqvae_gauss1", 8),
                                       ("celeba/sqvae_gauss1", 16), ("celebamask_hq/sqvae_vmf", 8)])
def test_latent_grid_and_output_shape(name, side):
    r = load_recipe(name)
    v = r.model.vision
    x = (torch.randint(0, v.num_classes, (2, 64, 64)) if v.num_classes
         else torch.rand(2, v.in_channels, v.image_size, v.image_size))
    model = build_model(r).eval()
    with torch.no_grad():
        out = model({"x": x})
    assert out.codes.shape == (2, side, side)
    assert out.x_hat.shape == ((2, 20, 64, 64) if v.num_classes else x.shape)
