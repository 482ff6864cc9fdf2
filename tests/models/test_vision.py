"""Vision encoder/decoder shapes, the vMF likelihood against an independent float64 formula, Bessel gradients,
mIoU, and the shipped image recipes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.special
import torch

from sqaudio.config import VisionModelConfig, list_recipes, load_recipe
from sqaudio.errors import UserError
from sqaudio.models.vision import ResBlock, VisionDecoder, VisionEncoder, class_channels
from sqaudio.models.vmf import VmfLikelihood, iou_counts, ive, log_normalizer, miou, miou_from_counts

IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "celeba", "celebamask_hq")


def tiny(**kw) -> VisionModelConfig:
    return dataclasses.replace(VisionModelConfig(channels=8, n_resblocks=1), **kw)


@pytest.mark.parametrize("network,size,chans,res,side", [("resnet28", 28, 1, 2, 7), ("resnet32", 32, 3, 2, 8),
                                                         ("resnet64", 64, 3, 6, 16), ("resnet64", 64, 3, 1, 16)])
def test_shapes_and_sigmoid_range(network, size, chans, res, side):
    cfg = tiny(network=network, image_size=size, in_channels=chans, n_resblocks=res)
    enc, dec = VisionEncoder(cfg, 12), VisionDecoder(cfg, 12, chans)
    x = torch.rand(3, chans, size, size)
    z = enc(x)
    assert z.shape == (3, 12, side, side)
    y = dec(z)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("classes,channels", [(19, 20), (5, 6), (4, 4)])
def test_class_map_input_is_one_hot_on_even_channels_and_output_raw(classes, channels):
    assert class_channels(classes) == channels
    cfg = tiny(network="resnet64_label", image_size=64, num_classes=classes)
    enc, dec = VisionEncoder(cfg, 8).eval(), VisionDecoder(cfg, 8, channels)
    labels = torch.randint(0, classes, (2, 64, 64))
    one_hot = torch.nn.functional.one_hot(labels, channels).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(enc(labels), enc(one_hot))
    assert enc(labels).shape == (2, 8, 8, 8)
    out = dec(enc(labels))
    assert out.shape == (2, channels, 64, 64) and out.min() < 0  # raw outputs, no sigmoid


def test_variance_head_is_separate():
    cfg = tiny(network="resnet28", image_size=28, in_channels=1)
    enc = VisionEncoder(cfg, 16, var_channels=8)
    h = enc(torch.rand(2, 1, 28, 28))
    assert h.shape == (2, 16, 7, 7)
    h[:, 8:].sum().backward()  # the variance channels depend on the var head, never on the mean head
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in enc.mean_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.var_head.parameters())


def test_decoder_projects_other_latent_widths():
    cfg = tiny(image_size=32)
    assert VisionDecoder(cfg, 5, 3)(torch.randn(2, 5, 8, 8)).shape == (2, 3, 32, 32)


def test_resblock_with_zero_scale_is_identity():
    block = ResBlock(4).eval()
    torch.nn.init.zeros_(block.block[-1].weight)
    torch.nn.init.zeros_(block.block[-1].bias)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(block(x), x)


def test_bad_geometry_is_a_user_error():
    with pytest.raises(UserError, match="divisible"):
        VisionEncoder(tiny(image_size=30), 4)
    with pytest.raises(UserError, match="resnet28, resnet32, resnet64, resnet64_label"):
        VisionEncoder(tiny(network="resnet48"), 4)
    with pytest.raises(UserError, match="n_resblocks >= 1"):
        VisionDecoder(tiny(n_resblocks=0), 4, 3)
    enc = VisionEncoder(tiny(image_size=32), 4)
    with pytest.raises(UserError, match="image_size is 32"):
        enc(torch.rand(1, 3, 28, 28))
    with pytest.raises(UserError, match="1 channels but the model expects 3"):
        enc(torch.rand(1, 1, 32, 32))
    with pytest.raises(UserError, match="output_activation"):
        VisionDecoder(tiny(output_activation="tanh"), 4, 3)


def test_autoencoder_learns():
    """Encoder and decoder are wired end to end: a few Adam steps cut the reconstruction error."""
    torch.manual_seed(0)
    cfg = tiny(network="resnet28", image_size=28, in_channels=1, channels=16)
    net = torch.nn.Sequential(VisionEncoder(cfg, 8), VisionDecoder(cfg, 8, 1))
    grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"))  # (2, 28, 28)
    centres = torch.rand(8, 2, 1, 1) * 16 + 6
    x = (((grid - centres) ** 2).sum(1, keepdim=True) < 36).float()  # (8, 1, 28, 28) discs
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(net(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * x.var().item()  # far better than the best constant image


# --- vMF likelihood ---------------------------------------------------------------------------------------------

def vmf_nll_reference(logits: np.ndarray, labels: np.ndarray, log_kappa_inv: float, mask=None) -> float:
    """-1/B sum over valid pixels of [kappa <mu, e_x> + (p/2-1) log kappa - log I_{p/2-1}(kappa)], float64, loops."""
    b, p, h, w = logits.shape
    kappa = 1.0 / (np.exp(log_kappa_inv) + 1e-9)
    log_c = (p / 2 - 1) * np.log(kappa) - np.log(scipy.special.iv(p / 2 - 1, kappa))
    total = 0.0
    for i in range(b):
        for r in range(h):
            for c in range(w):
                if mask is not None and not mask[i, r, c]:
                    continue
                v = logits[i, :, r, c]
                total += kappa * v[labels[i, r, c]] / np.linalg.norm(v) + log_c
    return -total / b


@pytest.mark.parametrize("classes,log_kappa_inv", [(19, np.log(0.01)), (6, np.log(0.5)), (2, 0.0)])
def test_vmf_loss_equals_formula(classes, log_kappa_inv):
    rng = np.random.default_rng(classes)
    logits = rng.normal(size=(2, classes, 3, 4))
    labels = rng.integers(0, classes, size=(2, 3, 4))
    lik = VmfLikelihood(classes, log_kappa_inv)
    losses, stats = lik(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    expected = vmf_nll_reference(logits, labels, log_kappa_inv)
    assert losses["reconstruction"].item() == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert stats["kappa"].item() == pytest.approx(1 / (np.exp(log_kappa_inv) + 1e-9), rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(np.mean(logits.argmax(1) == labels))


def test_vmf_mask_counts_only_valid_pixels():
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(2, 5, 4, 4)), rng.integers(0, 5, size=(2, 4, 4))
    mask = rng.random((2, 4, 4)) > 0.4
    losses, stats = VmfLikelihood(5, -1.0)(torch.tensor(logits), torch.tensor(labels), torch.tensor(mask))
    assert losses["reconstruction"].item() == pytest.approx(vmf_nll_reference(logits, labels, -1.0, mask), rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(np.mean((logits.argmax(1) == labels)[mask]))


def test_vmf_gradients_reach_kappa_and_logits():
    logits = torch.randn(2, 7, 4, 4, requires_grad=True)
    lik = VmfLikelihood(7, np.log(0.1))
    lik(logits, torch.randint(0, 7, (2, 4, 4)))[0]["reconstruction"].backward()
    assert logits.grad.abs().sum() > 0 and lik.log_kappa_inv.grad.abs() > 0


def test_vmf_kappa_gradient_matches_finite_difference():
    """d loss / d log_kappa_inv through the Bessel normaliser equals a central difference of the float64 formula."""
    rng = np.random.default_rng(5)
    logits, labels = rng.normal(size=(2, 19, 3, 3)), rng.integers(0, 19, size=(2, 3, 3))
    lik = VmfLikelihood(19, np.log(0.05)).double()
    lik(torch.tensor(logits), torch.tensor(labels))[0]["reconstruction"].backward()
    eps = 1e-5
    fd = (vmf_nll_reference(logits, labels, np.log(0.05) + eps)
          - vmf_nll_reference(logits, labels, np.log(0.05) - eps)) / (2 * eps)
    assert lik.log_kappa_inv.grad.item() == pytest.approx(fd, rel=1e-5)


@pytest.mark.parametrize("v", [0.0, 0.5, 1.0, 8.5, 9.0, 31.5])
def test_ive_value_and_gradient(v):
    k = torch.tensor([0.3, 2.0, 17.0, 100.0, 450.0], dtype=torch.float64, requires_grad=True)
    np.testing.assert_allclose(ive(v, k).detach().numpy(), scipy.special.iv(v, k.detach().numpy())
                               * np.exp(-k.detach().numpy()), rtol=1e-10)
    assert torch.autograd.gradcheck(lambda t: ive(v, t), (k,), eps=1e-6, atol=1e-9, rtol=1e-5)


def test_log_normalizer_matches_direct_formula_in_float32():
    for p, kappa in [(19, 100.0), (20, 100.0), (3, 0.5), (65, 5.0)]:
        got = log_normalizer(torch.tensor(kappa, dtype=torch.float32), p)
        want = (p / 2 - 1) * np.log(kappa) - np.log(scipy.special.iv(p / 2 - 1, kappa))
        assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-5)


def test_celebamask_vmf_lives_on_the_sphere_of_20_channels():
    """19 classes -> 20 one-hot/vMF channels (reference): the model's loss uses log C_20, not log C_19."""
    from sqaudio.models.sqvae import build_model

    torch.manual_seed(0)
    r = load_recipe("celebamask_hq/sqvae_vmf", ["model.vision.channels=16", "quantizer.dim=16"])
    model = build_model(r).eval()
    assert model.encoder.in_channels == 20
    labels = torch.randint(0, 19, (2, 64, 64))
    with torch.no_grad():
        out = model({"x": labels})
    assert out.x_hat.shape == (2, 20, 64, 64)
    logits = out.x_hat.double().numpy()
    want = vmf_nll_reference(logits[:, :, ::8, ::8], labels.numpy()[:, ::8, ::8], r.model.kappa_inv_init)
    lik = model.likelihood
    got = lik(out.x_hat[:, :, ::8, ::8], labels[:, ::8, ::8])[0]["reconstruction"].item()
    assert got == pytest.approx(want, rel=1e-5)
    on_19 = lik(out.x_hat[:, :19, ::8, ::8], labels[:, ::8, ::8])[0]["reconstruction"].item()
    assert abs(got - on_19) > 1.0  # the sphere matters: 19 channels would give another loss


# --- mIoU ----------------------------------------------------------------------------------------------------------

def test_miou_against_loops():
    rng = np.random.default_rng(7)
    pred, target = rng.integers(0, 6, size=(3, 8, 8)), rng.integers(0, 5, size=(3, 8, 8))  # class 5 only predicted
    ious = []
    for c in range(7):  # class 6 appears nowhere: not counted
        inter = np.sum((pred == c) & (target == c))
        union = np.sum((pred == c) | (target == c))
        if union:
            ious.append(inter / union)
    assert miou(torch.tensor(pred), torch.tensor(target), 7).item() == pytest.approx(np.mean(ious))


def test_miou_from_scores_mask_and_accumulated_counts():
    rng = np.random.default_rng(8)
    scores, target = torch.tensor(rng.normal(size=(2, 4, 5, 5))), torch.tensor(rng.integers(0, 4, size=(2, 5, 5)))
    pred = scores.argmax(1)
    assert miou(scores, target, 4).item() == pytest.approx(miou(pred, target, 4).item())
    assert miou(target, target, 4).item() == 1.0
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[0] = True
    assert miou(pred, target, 4, mask).item() == pytest.approx(miou(pred[:1], target[:1], 4).item())
    a, b = iou_counts(pred[:1], target[:1], 4), iou_counts(pred[1:], target[1:], 4)
    whole = miou_from_counts(a[0] + b[0], a[1] + b[1])
    assert whole.item() == pytest.approx(miou(pred, target, 4).item())


# --- recipes -----------------------------------------------------------------------------------------------------

def image_recipes() -> list[str]:
    return [r for r in list_recipes() if r.split("/")[0] in IMAGE_DATASETS]


def test_image_recipes_carry_the_paper_settings():
    names = set(image_recipes())
    for dataset in IMAGE_DATASETS[:4]:
        assert {f"{dataset}/sqvae_gauss1", f"{dataset}/vqvae_ema"} <= names
    for dataset in ("cifar10", "celeba"):
        assert {f"{dataset}/sqvae_gauss{v}" for v in (2, 3, 4)} <= names
    assert {"celebamask_hq/sqvae_vmf", "fashion_mnist/short_sqvae_gauss1", "fashion_mnist/short_vqvae_ema"} <= names
    for name in names:
        r = load_recipe(name)
        assert r.model.kind == "vision" and r.data.kind == name.split("/")[0]
        assert (r.data.batch_size, r.train.lr, r.quantizer.temperature.init) == (32, 1e-3, 1.0)
        k = {"mnist": 128, "fashion_mnist": 128, "cifar10": 512, "celeba": 512, "celebamask_hq": 64}[r.data.kind]
        assert r.quantizer.codebook_size == k
        if r.quantizer.kind == "gaussian":
            assert r.quantizer.dim == 64 and r.quantizer.var_combine == "add"
            assert r.quantizer.var_init == (10.0 if "mnist" in r.data.kind else 20.0)
    assert load_recipe("celeba/sqvae_gauss1").model.vision.n_resblocks == 6
    assert load_recipe("celeba/sqvae_gauss1").train.epochs == 70
    short = [load_recipe(f"fashion_mnist/short_{m}") for m in ("sqvae_gauss1", "vqvae_ema")]
    assert short[0].train == short[1].train and short[0].model == short[1].model and short[0].data == short[1].data


@pytest.mark.parametrize("name", ["mnist/sqvae_gauss1", "cifar10/sqvae_gauss4", "celeba/sqvae_gauss2",
                                  "celeba/vqvae_ema", "celebamask_hq/sqvae_vmf"])
def test_recipe_family_trains_a_few_steps_at_tiny_width(name):
    """Each recipe family builds through sqaudio.models.sqvae and its loss falls over a few steps on a fixed batch."""
    from sqaudio.models.sqvae import build_model

    torch.manual_seed(0)
    r = load_recipe(name, ["model.vision.channels=8", "model.vision.n_resblocks=1", "quantizer.dim=8",
                           "quantizer.codebook_size=16"])
    v = r.model.vision
    if v.num_classes:
        x = torch.randint(0, v.num_classes, (4, v.image_size, v.image_size))
    else:
        x = torch.rand(4, v.in_channels, v.image_size, v.image_size)
    model = build_model(r)
    opt = torch.optim.Adam(model.parameters(), lr=r.train.lr)
    losses = []
    for _ in range(8):
        out = model({"x": x})
        assert out.x_hat.shape[-2:] == x.shape[-2:]
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
