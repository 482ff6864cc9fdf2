"""Reconstruction likelihoods against numpy formulas on padded batches: the Gaussian with MLE sigma
((D/2) log MSE, D = valid elements per sample) and the Gaussian with a learned log sigma^2."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sqaudio.config import ModelConfig, load_recipe
from sqaudio.models.likelihoods import build_likelihood
from sqaudio.models.speech import encoder_lengths
from sqaudio.models.sqvae import build_model

LENGTHS = (10, 7, 3)


def padded_pair(seed: int = 0, channels: int = 4, fill: float = 0.0):
    """x_hat and x (B, C, T) of different valid lengths, padding filled with `fill`, and the (B, 1, T) mask."""
    rng = np.random.default_rng(seed)
    size = max(LENGTHS)
    x_hat = rng.standard_normal((len(LENGTHS), channels, size))
    x = rng.standard_normal((len(LENGTHS), channels, size))
    mask = np.arange(size)[None, None, :] < np.array(LENGTHS)[:, None, None]
    x_hat = np.where(mask, x_hat, fill)
    x = np.where(mask, x, -fill)
    return x_hat, x, mask


def valid_sums(x_hat: np.ndarray, x: np.ndarray, lengths=LENGTHS) -> tuple[float, int]:
    """Sum of squared errors and element count over each sample's first `length` frames only."""
    sse = sum(float(((x_hat[i, :, :n] - x[i, :, :n]) ** 2).sum()) for i, n in enumerate(lengths))
    count = sum(x.shape[1] * n for n in lengths)
    return sse, count


def tensors(*arrays):
    return [torch.tensor(a, dtype=torch.float32) if a.dtype != bool else torch.tensor(a) for a in arrays]


@pytest.mark.parametrize("fill", [0.0, 5.0])
def test_gaussian_mle_on_a_padded_batch_is_half_valid_dims_times_log_mse(fill):
    x_hat, x, mask = padded_pair(fill=fill)
    sse, count = valid_sums(x_hat, x)
    dims = count / len(LENGTHS)  # valid elements per sample
    expected = 0.5 * dims * np.log(sse / count)
    losses, stats = build_likelihood(ModelConfig(likelihood="gaussian_mle"))(*tensors(x_hat, x, mask))
    assert losses["reconstruction"].item() == pytest.approx(expected, rel=1e-5)
    assert stats["mse"].item() == pytest.approx(sse / count, rel=1e-5)


def test_gaussian_mle_without_mask_counts_every_element():
    x_hat, x, _ = padded_pair(fill=1.0)
    count = x.size
    expected = 0.5 * (count / x.shape[0]) * np.log(((x_hat - x) ** 2).sum() / count)
    losses, _ = build_likelihood(ModelConfig(likelihood="gaussian_mle"))(*tensors(x_hat, x))
    assert losses["reconstruction"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("log_var", [0.7, -2.302585])
def test_gaussian_learned_on_a_padded_batch_matches_its_formula(log_var):
    x_hat, x, mask = padded_pair(seed=1, fill=3.0)
    sse, count = valid_sums(x_hat, x)
    batch = len(LENGTHS)
    var = np.exp(log_var)
    # -log N(x; x_hat, var I) per sample without the constant: SSE / (2 var) + (D / 2) log var
    expected = sse / batch / (2 * var) + 0.5 * (count / batch) * log_var
    likelihood = build_likelihood(ModelConfig(likelihood="gaussian_learned", log_var_x_init=log_var))
    losses, stats = likelihood(*tensors(x_hat, x, mask))
    assert losses["reconstruction"].item() == pytest.approx(expected, rel=1e-5)
    assert stats["mse"].item() == pytest.approx(sse / count, rel=1e-5)
    assert stats["var_x"].item() == pytest.approx(var, rel=1e-5)
    # the variance is learned: a trainable parameter whose gradient is d/dlog_var = -SSE/(2 var B) + D/2
    params = list(likelihood.parameters())
    assert len(params) == 1 and params[0].requires_grad
    losses["reconstruction"].backward()
    assert params[0].grad.item() == pytest.approx(-sse / batch / (2 * var) + 0.5 * count / batch, rel=1e-4)


def test_gaussian_learned_without_mask_counts_every_element():
    x_hat, x, _ = padded_pair(seed=2, fill=-1.0)
    batch, count = x.shape[0], x.size
    sse = float(((x_hat - x) ** 2).sum())
    expected = sse / batch / (2 * np.exp(0.3)) + 0.5 * (count / batch) * 0.3
    losses, _ = build_likelihood(ModelConfig(likelihood="gaussian_learned", log_var_x_init=0.3))(*tensors(x_hat, x))
    assert losses["reconstruction"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("likelihood", ["gaussian_mle", "gaussian_learned"])
def test_speech_model_objective_on_padded_batch_equals_formula_over_utterances_alone(likelihood):
    """The model's reconstruction term on a padded batch, against numpy over each utterance decoded alone."""
    recipe = load_recipe("demo/tiny", ["model.speech.n_speakers=3", "model.speech.jitter=0.0",
                                       f"model.likelihood={likelihood}", "model.log_var_x_init=0.4"])
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    mels = [torch.rand(80, n) for n in (40, 26, 33)]
    lengths = torch.tensor([m.shape[-1] for m in mels])
    mel = torch.zeros(len(mels), 80, int(lengths.max()))
    for row, m in zip(mel, mels):
        row[:, : m.shape[-1]] = m
    with torch.no_grad():
        out = model({"mel": mel, "lengths": lengths, "speaker": torch.arange(3)})
        sse, count = 0.0, 0
        for i, m in enumerate(mels):
            frames = 2 * int(encoder_lengths(torch.tensor(m.shape[-1])))
            alone = model({"mel": m[None], "speaker": torch.tensor([i])}).x_hat[0].double().numpy()
            target = m[:, 1:1 + frames].double().numpy()
            assert alone.shape == target.shape
            sse += float(((alone - target) ** 2).sum())
            count += target.size
    batch = len(mels)
    if likelihood == "gaussian_mle":
        expected = 0.5 * (count / batch) * np.log(sse / count)
    else:
        expected = sse / batch / (2 * np.exp(0.4)) + 0.5 * (count / batch) * 0.4
    assert out.losses["reconstruction"].item() == pytest.approx(expected, rel=1e-4)
