"""Speech model: masks make a padded batch equal to its utterances one by one."""
import pytest
import torch

from sqaudio.config import Recipe, load_recipe
from sqaudio.models.speech import MaskedBatchNorm1d, encoder_lengths, length_mask, masked_bigru, reversal_index
from sqaudio.models.sqvae import build_model


def tiny_recipe(**quantizer) -> Recipe:
    overrides = ["model.speech.n_speakers=3", "model.speech.jitter=0.0"] + [f"quantizer.{k}={v}" for k, v in quantizer.items()]
    return load_recipe("demo/tiny", overrides)


def test_encoder_lengths_match_conv_arithmetic():
    model = build_model(tiny_recipe())
    for frames in (6, 7, 34, 101):
        h = model.encoder(torch.randn(1, 80, frames))
        assert h.shape[-1] == encoder_lengths(torch.tensor(frames)).item()


def test_masked_batchnorm_ignores_padding():
    torch.manual_seed(0)
    bn_a, bn_b = MaskedBatchNorm1d(4), MaskedBatchNorm1d(4)
    x = torch.randn(2, 4, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    padded = x.clone()
    padded[1, :, 6:] = 1e3  # garbage in the padding
    ya = bn_a(padded, mask)
    valid = torch.cat([x[0], x[1, :, :6]], dim=1)[None]  # all valid positions as one sequence
    yb = bn_b(valid)
    torch.testing.assert_close(torch.cat([ya[0], ya[1, :, :6]], dim=1)[None], yb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var)


def _utterances():
    torch.manual_seed(1)
    return [torch.rand(80, n) for n in (40, 26, 33)]


def _batch(mels, speakers):
    lengths = torch.tensor([m.shape[-1] for m in mels])
    mel = torch.zeros(len(mels), 80, int(lengths.max()))
    for row, m in zip(mel, mels):
        row[:, : m.shape[-1]] = m
    return {"mel": mel, "lengths": lengths, "speaker": torch.tensor(speakers)}


def test_padded_batch_equals_utterances_one_by_one_in_eval():
    model = build_model(tiny_recipe()).eval()
    mels = _utterances()
    out = model(_batch(mels, [0, 1, 2]))
    for i, m in enumerate(mels):
        single = model({"mel": m[None], "speaker": torch.tensor([i])})
        n = single.x_hat.shape[-1]
        torch.testing.assert_close(out.x_hat[i, :, :n], single.x_hat[0], atol=1e-5, rtol=1e-5)
        assert out.mask[i, 0].sum() == n
        torch.testing.assert_close(out.codes[i, : single.codes.shape[-1]], single.codes[0])


def test_padded_training_loss_and_gradients_ignore_padding():
    """Same loss and gradients whatever garbage fills the padding (BatchNorm stats, GRU, quantizer, likelihood)."""
    mels = _utterances()
    grads, losses = [], []
    for fill in (0.0, 5.0):
        torch.manual_seed(0)
        model = build_model(tiny_recipe()).train()
        batch = _batch(mels, [0, 1, 2])
        for i, m in enumerate(mels):
            batch["mel"][i, :, m.shape[-1]:] = fill
        torch.manual_seed(123)
        out = model(batch, temperature=0.5)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_jitter_copies_only_neighbours_inside_each_utterance():
    from sqaudio.models.speech import Jitter

    jitter = Jitter(1.0).train()  # every latent is replaced by a neighbour
    lengths = torch.tensor([7, 3])
    z = torch.arange(7.0).expand(2, 1, 7).clone()  # the value of a latent is its position
    torch.manual_seed(0)
    for _ in range(20):
        out = jitter(z, lengths)[:, 0]
        for row, n in zip(out, lengths):
            src = row[:n]
            assert torch.all(src <= n - 1) and torch.all(src >= 0)
            assert torch.all((src - torch.arange(float(n))).abs() <= 1)
    assert torch.equal(Jitter(0.5).eval()(z, lengths), z)


def _packed_bigru(rnn, x, lengths):
    """The reference: the bidirectional GRU on packed sequences (lengths on the host), padded back with zeros."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]


@pytest.mark.parametrize("lengths", [[9, 1, 2, 5], [7, 7, 7], [1], [2, 1]])
def test_masked_bigru_equals_packed_gru_in_outputs_and_gradients(lengths):
    """Valid outputs and the gradients (input, every parameter) equal the packed GRU's, whatever the padding holds."""
    torch.manual_seed(0)
    rnn = torch.nn.GRU(5, 4, num_layers=2, batch_first=True, bidirectional=True).double()
    lengths = torch.tensor(lengths)
    mask = length_mask(lengths, int(lengths.max()))[:, :, None]
    results = []
    for run in (masked_bigru, _packed_bigru):
        x = torch.randn(mask.shape[:2] + (5,), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x = torch.where(mask, x, torch.full_like(x, 1e3)).requires_grad_()  # garbage in the padding
        out = run(rnn, x, lengths)
        weight = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        (out * weight * mask).sum().backward()
        results.append([out * mask, x.grad] + [p.grad.clone() for p in rnn.parameters()])
        rnn.zero_grad()
    names = ["output", "input grad"] + [name for name, _ in rnn.named_parameters()]
    for name, got, want in zip(names, *results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_reversal_index_reverses_each_row_within_its_length():
    index = reversal_index(torch.tensor([3, 1, 4]), 4)
    assert index.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]


def test_full_length_utterances_decode_like_crops():
    """With every length equal to the padded size, the per-layer fused GRU gives the plain nn.GRU call's output."""
    model = build_model(tiny_recipe()).eval()
    z, speakers = torch.randn(2, 8, 6), torch.tensor([0, 2])
    torch.testing.assert_close(model.decode(z, speakers, torch.tensor([6, 6])), model.decode(z, speakers))


def test_masked_batchnorm_without_momentum_keeps_torchs_cumulative_average():
    """momentum=None: running statistics are the cumulative average, as nn.BatchNorm1d keeps them."""
    torch.manual_seed(0)
    ours, theirs = MaskedBatchNorm1d(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(4, 3, 5)
        ours(x, torch.ones(4, 5, dtype=torch.bool))
        theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
