"""The VQ-VAE baselines' objectives, recomputed independently from the model's encoder, codebook and decoder.

textbook (van den Oord et al.; bshall/ZeroSpeech): mean((x_hat - x)^2) + 0.25 * mean((z - e)^2) over elements;
mle_sigma: (D/2) log(mean squared error) + 0.25 * per-sample sum of (z - e)^2, averaged over the batch.
"""
from __future__ import annotations

import math

import pytest
import torch

from sqaudio.config import load_recipe
from sqaudio.errors import UserError
from sqaudio.models.sqvae import build_model

TINY = ["model.vision.channels=8", "quantizer.dim=8", "quantizer.codebook_size=16"]


def _nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> the nearest codebook vectors, by an explicit loop over codes."""
    dists = torch.stack([((z - c.view(1, -1, 1, 1)) ** 2).sum(1) for c in codebook], dim=-1)  # (B, H, W, K)
    return codebook[dists.argmin(-1)].permute(0, 3, 1, 2)


@pytest.mark.parametrize("objective", ["textbook", "mle_sigma"])
def test_image_vq_loss_equals_the_formula(objective):
    torch.manual_seed(0)
    recipe = load_recipe("fashion_mnist/vqvae_ema", TINY + [f"quantizer.vq_objective={objective}"])
    model = build_model(recipe).eval()
    with torch.no_grad():  # spread the codebook so that several codes are in use
        model.quantizer.codebook.normal_(0, 0.05)
    x = torch.rand(4, 1, 28, 28)
    out = model({"x": x})
    with torch.no_grad():
        z = model.encoder(x)
        e = _nearest(z, model.quantizer.codebook)
        x_hat = model.decoder(e)
    sq_rec, sq_lat = (x_hat - x) ** 2, (z - e) ** 2
    if objective == "textbook":
        want = sq_rec.mean() + 0.25 * sq_lat.mean()
    else:
        want = 784 / 2 * math.log(sq_rec.mean()) + 0.25 * sq_lat.sum() / 4
    torch.testing.assert_close(out.loss.detach(), torch.as_tensor(want, dtype=out.loss.dtype), rtol=1e-5, atol=1e-7)
    assert set(out.losses) == {"reconstruction", "commitment"}


def test_speech_textbook_loss_counts_only_valid_elements():
    """A padded speech batch: MSE over valid mel elements, commitment mean over valid latent elements."""
    torch.manual_seed(0)
    recipe = load_recipe("demo/tiny", ["model.speech.n_speakers=2", "model.speech.jitter=0.0",
                                       "quantizer.kind=vq_ema", "quantizer.vq_objective=textbook"])
    model = build_model(recipe).eval()
    with torch.no_grad():
        model.quantizer.codebook.normal_(0, 0.05)
    mels = [torch.rand(80, 30), torch.rand(80, 20)]
    batch = {"mel": torch.zeros(2, 80, 30), "lengths": torch.tensor([30, 20]), "speaker": torch.tensor([0, 1])}
    for row, m in zip(batch["mel"], mels):
        row[:, : m.shape[-1]] = m
    out = model(batch)
    rec, rec_n, lat, lat_n = 0.0, 0, 0.0, 0
    for i, m in enumerate(mels):
        single = model({"mel": m[None], "speaker": batch["speaker"][i: i + 1]})
        n = single.x_hat.shape[-1]
        rec += ((single.x_hat - m[None, :, 1:1 + n]) ** 2).sum().item()
        rec_n += single.x_hat.numel()
        z = model.encoder(m[None])[:, : recipe.quantizer.dim]          # (1, D, T')
        e = model.quantizer.lookup(single.codes)
        lat += ((z - e) ** 2).sum().item()
        lat_n += z.numel()
    assert out.loss.item() == pytest.approx(rec / rec_n + 0.25 * lat / lat_n, rel=1e-4)


def test_vq_objective_is_validated_and_shipped_recipes_use_textbook():
    with pytest.raises(UserError, match="textbook, mle_sigma"):
        build_model(load_recipe("mnist/vqvae_ema", TINY + ["quantizer.vq_objective=mle"]))
    with pytest.raises(UserError, match="vq_objective=mle_sigma"):
        build_model(load_recipe("celebamask_hq/sqvae_vmf", ["quantizer.kind=vq_ema"]))
    for name, decay, objective in [("vctk/mini_vqvae_ema", 0.999, "textbook"),
                                   ("vctk/mini_vqvae_ema_decay099", 0.99, "textbook"),
                                   ("vctk/mini_vqvae_ema_mle_sigma", 0.999, "mle_sigma"),
                                   ("vctk/vqvae_ema", 0.999, "textbook"), ("vctk/vqvae_ema_decay099", 0.99, "textbook"),
                                   ("zerospeech2019/vqvae_ema", 0.999, "textbook"),
                                   ("fashion_mnist/short_vqvae_ema", 0.99, "textbook"),
                                   ("fashion_mnist/short_vqvae_ema_decay0999", 0.999, "textbook"),
                                   ("fashion_mnist/short_vqvae_ema_mle_sigma", 0.99, "mle_sigma"),
                                   ("mnist/vqvae_ema_decay0999", 0.999, "textbook"),
                                   ("celeba/vqvae_ema", 0.99, "textbook")]:
        q = load_recipe(name).quantizer
        assert (q.kind, q.vq_decay, q.vq_objective, q.vq_beta) == ("vq_ema", decay, objective, 0.25), name
    sq, vq = load_recipe("vctk/mini_sqvae_gauss4"), load_recipe("vctk/mini_vqvae_ema_decay099")
    assert (sq.train, sq.model, sq.data) == (vq.train, vq.model, vq.data)
