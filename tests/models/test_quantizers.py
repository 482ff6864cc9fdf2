"""Quantizer tests: every formula is recomputed here independently (direct broadcast, as the reference code
writes it), and masking is tested as an invariance (a padded batch behaves like its valid parts alone)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sqaudio.config import QuantizerConfig
from sqaudio.errors import UserError
from sqaudio.models.quantizers import weighted_sq_distance
from sqaudio.models.sqvae import QUANTIZERS, build_quantizer
from sqaudio.models.stochastic import FixedGaussianSQ, GaussianSQ, VmfSQ
from sqaudio.models.vq import VQEMA

K, D = 6, 4


def make(kind="gaussian", variant=4, combine="log_add", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind=kind, variant=variant, var_combine=combine, codebook_size=kw.pop("k", K),
                          dim=kw.pop("d", D), **kw)
    return build_quantizer(cfg).double()


def inputs(q, shape=(2, 5), seed=1, scale=1.0):
    """z (B, D, *S) and var_logits (B, C, *S) in float64 requiring grad."""
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(shape[0], q.dim, *shape[1:], generator=g, dtype=torch.float64)).requires_grad_()
    v = None
    if q.n_var_channels:
        v = (0.5 * torch.randn(shape[0], q.n_var_channels, *shape[1:], generator=g,
                               dtype=torch.float64)).requires_grad_()
    return z, v


# ---------------------------------------------------------------- independent reference computations
def direct_distance(z, codebook, weight):
    """sum_d w_d (z_d - b_kd)^2 by broadcasting an (N, D, K) tensor, as sony/sqvae's SQEmbedding does."""
    return (weight.unsqueeze(2) * (z.unsqueeze(2) - codebook.t().unsqueeze(0)) ** 2).sum(1)


def reference_variance(q, z, var_logits, combine):
    """Reference var_q broadcastable to channels-last (B, *S, D): speech (log_add) and images (add) code paths."""
    s = q.log_var_scalar
    if combine == "log_add":                          # speech/model.py: log_var_q = z[..., D:] + scalar
        log_var = s if var_logits is None else var_logits.movedim(1, -1) + s
        return log_var.exp()
    if var_logits is None:                            # vision/model.py: log_var_q = 0 for gaussian_1
        log_var = torch.zeros(())
    elif q.variant == 2:
        log_var = var_logits.mean(dim=tuple(range(1, var_logits.dim())), keepdim=True).movedim(1, -1)
    elif q.variant == 3:
        log_var = var_logits.mean(dim=1, keepdim=True).movedim(1, -1)
    else:
        log_var = var_logits.movedim(1, -1)
    return log_var.exp() + s.exp()


def reference_sq(q, z, var_logits, combine, noise=None, tau=1.0):
    """The Gaussian SQ loss terms of the reference (channels-last, direct broadcast distance)."""
    x = z.movedim(1, -1)                                                  # (B, *S, D)
    var = reference_variance(q, z, var_logits, combine).expand_as(x)
    precision = 1.0 / var
    flat_x, flat_p = x.reshape(-1, q.dim), precision.reshape(-1, q.dim)
    logits = -0.5 * direct_distance(flat_x, q.codebook, flat_p)          # (N, K)
    if noise is None:
        z_q = q.codebook[logits.argmax(-1)]
    else:
        eps = torch.finfo(logits.dtype).eps
        g = -torch.log(-torch.log(noise.clamp(eps, 1 - eps)))
        z_q = torch.softmax((logits + g) / tau, -1) @ q.codebook
    z_q = z_q.view_as(x)
    b = z.shape[0]
    p, logp = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
    dist = (0.5 * precision * (x - z_q) ** 2).reshape(b, -1).sum(1).mean()
    ent = (p * logp).reshape(b, -1).sum(1).mean()
    return dist, ent, z_q.movedim(-1, 1), var.mean()


# ---------------------------------------------------------------- distance
@pytest.mark.parametrize("kind", ["none", "one", "row", "diag"])
def test_fast_distance_equals_direct_values_and_gradients(kind):
    g = torch.Generator().manual_seed(3)
    n = 11
    z = torch.randn(n, D, generator=g, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(K, D, generator=g, dtype=torch.float64, requires_grad=True)
    shape = {"none": None, "one": (1, 1), "row": (n, 1), "diag": (n, D)}[kind]
    w = None if shape is None else torch.rand(*shape, generator=g, dtype=torch.float64).add(0.1).requires_grad_()
    fast = weighted_sq_distance(z, cb, w)
    slow = direct_distance(z, cb, torch.ones(1, 1, dtype=torch.float64) if w is None else w.expand(n, D))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weighted_sq_distance(z, cb, w, scale=-0.5), -0.5 * slow, rtol=1e-10, atol=1e-10)
    seed = torch.randn(n, K, generator=g, dtype=torch.float64)
    leaves = [t for t in (z, cb, w) if t is not None]
    grads_fast = torch.autograd.grad((fast * seed).sum(), leaves)
    grads_slow = torch.autograd.grad((slow * seed).sum(), leaves)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- Gaussian SQ loss = reference formula
GAUSS_CASES = [(1, "log_add", (2, 5)), (3, "log_add", (2, 5)), (4, "log_add", (2, 5)),
               (1, "add", (2, 3, 3)), (2, "add", (2, 3, 3)), (3, "add", (2, 3, 3)), (4, "add", (2, 3, 3))]


@pytest.mark.parametrize("variant,combine,shape", GAUSS_CASES)
def test_gaussian_eval_loss_equals_reference(variant, combine, shape):
    q = make(variant=variant, combine=combine).eval()
    z, v = inputs(q, shape)
    out = q(z, v)
    dist, ent, z_q, var_mean = reference_sq(q, z, v, combine)
    torch.testing.assert_close(out.losses["latent_distance"], dist)
    torch.testing.assert_close(out.losses["latent_entropy"], ent)
    torch.testing.assert_close(out.z_q, z_q)
    torch.testing.assert_close(out.stats["var_q"], var_mean.detach())
    leaves = [z, q.codebook, q.log_var_scalar] + ([v] if v is not None else [])
    ours = torch.autograd.grad(sum(out.losses.values()), leaves)
    theirs = torch.autograd.grad(dist + ent, leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant,combine,shape", GAUSS_CASES[::2])
def test_gaussian_training_loss_equals_reference_with_same_gumbel_noise(variant, combine, shape):
    q = make(variant=variant, combine=combine).train()
    z, v = inputs(q, shape)
    torch.manual_seed(7)
    out = q(z, v, temperature=0.7)
    torch.manual_seed(7)
    n = math.prod(shape)
    noise = torch.rand(n, K, dtype=torch.float64)                       # same draws as the module's rand_like
    dist, ent, z_q, _ = reference_sq(q, z, v, combine, noise=noise, tau=0.7)
    torch.testing.assert_close(out.z_q, z_q)
    torch.testing.assert_close(out.losses["latent_distance"], dist)
    torch.testing.assert_close(out.losses["latent_entropy"], ent)
    leaves = [z, q.codebook, q.log_var_scalar] + ([v] if v is not None else [])
    seed = torch.randn_like(z_q)
    ours = torch.autograd.grad(sum(out.losses.values()) + (out.z_q * seed).sum(), leaves)
    theirs = torch.autograd.grad(dist + ent + (z_q * seed).sum(), leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_variance_channels_follow_reference_encoders():
    assert [make(variant=v).n_var_channels for v in (1, 3, 4)] == [0, 1, D]          # speech: D + 1, 2D outputs
    assert [make(variant=v, combine="add").n_var_channels for v in (1, 2, 3, 4)] == [0, D, D, D]  # images


def test_speech_variant1_and_image_variant1_variance():
    assert make(variant=1, var_init=10.0).eval()(*inputs(make(variant=1))).stats["var_q"] == pytest.approx(10.0)
    q = make(variant=1, combine="add", var_init=20.0).eval()
    assert q(*inputs(q)).stats["var_q"] == pytest.approx(21.0)                          # 1 + exp(log 20)


@pytest.mark.parametrize("kind,variant,combine", [("gaussian", 1, "log_add"), ("gaussian", 3, "log_add"),
                                                  ("gaussian", 4, "log_add"), ("gaussian", 2, "add"),
                                                  ("vmf", 1, "log_add")])
def test_gradients_reach_encoder_variance_codebook_and_scalar(kind, variant, combine):
    q = make(kind, variant, combine).train()
    z, v = inputs(q)
    out = q(z, v, temperature=0.5)
    (sum(out.losses.values()) + out.z_q.square().sum()).backward()
    scalar = q.log_kappa_scalar if kind == "vmf" else q.log_var_scalar
    for t in [z, q.codebook, scalar] + ([v] if v is not None else []):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_inference_picks_precision_weighted_argmin_not_euclidean():
    q = make(variant=4, k=2, d=2, var_init=1.0).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.5]]))
    z = torch.zeros(1, 2, 1, dtype=torch.float64)
    var = torch.tensor([10.0, 0.1], dtype=torch.float64)        # loose along dim 0, tight along dim 1
    v = var.log().view(1, 2, 1)                                  # s = log 1 = 0, so var_q = exp(v)
    euclid = ((z[0, :, 0] - q.codebook) ** 2).sum(1)
    weighted = ((z[0, :, 0] - q.codebook) ** 2 / var).sum(1)
    assert euclid.argmin() == 1 and weighted.argmin() == 0      # the construction separates the two
    out = q(z, v)
    assert out.codes.item() == 0
    torch.testing.assert_close(out.z_q[0, :, 0], q.codebook[0].detach())


def test_uniform_logits_give_entropy_log_k():
    q = make(variant=1).eval()
    with torch.no_grad():
        q.codebook.zero_()                                       # every code equally far: P_hat uniform
    z, _ = inputs(q, (3, 4))
    out = q(z)
    assert out.stats["entropy"].item() == pytest.approx(math.log(K))
    assert out.losses["latent_entropy"].item() == pytest.approx(-4 * math.log(K))   # per-sample sum, 4 positions


@pytest.mark.parametrize("kind", ["gaussian", "vq_ema"])
def test_perplexity_of_one_hot_usage(kind):
    q = make(kind, variant=1, var_init=1e-3, d=K).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.eye(K, dtype=torch.float64))
    used = [0, 0, 3, 5, 5, 5, 0, 3]
    z = torch.eye(K, dtype=torch.float64)[used].t().unsqueeze(0)   # (1, D, T) sitting on codes
    out = q(z)
    assert out.codes[0].tolist() == used
    freq = [used.count(c) / len(used) for c in set(used)]
    assert out.stats["perplexity"].item() == pytest.approx(math.exp(-sum(p * math.log(p) for p in freq)))
    z3 = torch.eye(K, dtype=torch.float64)[[1, 2, 4] * 3].t().unsqueeze(0)
    assert q(z3).stats["perplexity"].item() == pytest.approx(3.0)
    if kind == "vq_ema":
        assert out.stats["used_codes"].item() == 3


# ---------------------------------------------------------------- masking
def _padded_pair(q, la=7, lb=4, fill=1e3):
    za, va = inputs(q, (1, la), seed=11)
    zb, vb = inputs(q, (1, lb), seed=12)
    z = torch.full((2, q.dim, la), fill, dtype=torch.float64)
    z[0], z[1, :, :lb] = za[0].detach(), zb[0].detach()
    v = None
    if va is not None:
        v = torch.full((2, q.n_var_channels, la), -fill, dtype=torch.float64)
        v[0], v[1, :, :lb] = va[0].detach(), vb[0].detach()
        v.requires_grad_()
    mask = torch.arange(la).unsqueeze(0) < torch.tensor([[la], [lb]])
    return (za, va), (zb, vb), (z.requires_grad_(), v, mask)


@pytest.mark.parametrize("kind,variant,combine", [("gaussian", 1, "log_add"), ("gaussian", 3, "log_add"),
                                                  ("gaussian", 4, "log_add"), ("gaussian", 2, "log_add"),
                                                  ("gaussian", 2, "add"), ("vmf", 1, "log_add"),
                                                  ("vq_ema", 1, "log_add")])
def test_padded_batch_equals_its_parts(kind, variant, combine):
    """Per-sample sums averaged over the batch (the VQ commitment under vq_objective=mle_sigma)."""
    extra = {"vq_objective": "mle_sigma"} if kind == "vq_ema" else {}
    q = make(kind, variant, combine, **extra).eval()
    (za, va), (zb, vb), (z, v, mask) = _padded_pair(q)
    out = q(z, v, mask)
    parts = [q(za, va), q(zb, vb)]
    for name, value in out.losses.items():
        torch.testing.assert_close(value, (parts[0].losses[name] + parts[1].losses[name]) / 2)
    params = [p for p in q.parameters()]
    total = sum(out.losses.values()) + (out.z_q * mask.unsqueeze(1)).sum() / 2
    grads = torch.autograd.grad(total, [z] + params + ([v] if v is not None else []))
    part_grads = [torch.autograd.grad(sum(o.losses.values()) / 2 + o.z_q.sum() / 2,
                                      [zz] + params + ([vv] if vv is not None else []))
                  for o, zz, vv in zip(parts, (za, zb), (va, vb))]
    lb = zb.shape[-1]
    torch.testing.assert_close(grads[0][0], part_grads[0][0][0])
    torch.testing.assert_close(grads[0][1, :, :lb], part_grads[1][0][0])
    assert (grads[0][1, :, lb:] == 0).all()
    for i in range(1, 1 + len(params)):
        torch.testing.assert_close(grads[i], part_grads[0][i] + part_grads[1][i])
    if v is not None:
        torch.testing.assert_close(grads[-1][0], part_grads[0][-1][0])
        torch.testing.assert_close(grads[-1][1, :, :lb], part_grads[1][-1][0])
        assert (grads[-1][1, :, lb:] == 0).all()
    if variant != 2:   # positions are independent: pooled stats equal those of the concatenated utterances
        cat = q(torch.cat([za, zb], -1), None if va is None else torch.cat([va, vb], -1))
        for name, value in out.stats.items():
            torch.testing.assert_close(value, cat.stats[name])


@pytest.mark.parametrize("kind", ["gaussian", "vmf", "vq_ema"])
def test_padding_content_is_inert_in_training(kind):
    q = make(kind).train()
    runs = []
    for fill in (0.0, float("nan")):
        _, _, (z, v, mask) = _padded_pair(q, fill=fill)
        with torch.no_grad():
            z[1, :, 4:] = fill
        torch.manual_seed(5)
        out = q(z, v, mask, temperature=0.5)
        grads = torch.autograd.grad(sum(out.losses.values()), [z, *q.parameters()])
        runs.append((out, [g[1, :, :4] if i == 0 else g for i, g in enumerate(grads)]))
        q.load_state_dict(make(kind).state_dict())   # undo the EMA update so both runs start alike
    (a, ga), (b, gb) = runs
    for name in a.losses:
        torch.testing.assert_close(a.losses[name], b.losses[name])
    for name in a.stats:
        torch.testing.assert_close(a.stats[name], b.stats[name])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------- VQ-VAE with EMA
@pytest.mark.parametrize("objective", ["textbook", "mle_sigma"])
def test_vq_ema_commitment_and_straight_through(objective):
    q = make("vq_ema", vq_beta=0.25, vq_objective=objective).eval()
    z, _ = inputs(q, (3, 5), scale=0.01)
    out = q(z)
    x = z.detach().movedim(1, -1).reshape(-1, D)
    nearest = ((x.unsqueeze(1) - q.codebook.unsqueeze(0)) ** 2).sum(-1).argmin(1)
    e = q.codebook[nearest].view(3, 5, D).movedim(-1, 1)
    assert out.codes.flatten().tolist() == nearest.tolist()
    torch.testing.assert_close(out.z_q, e)
    sq = (z - e) ** 2
    want = sq.mean() if objective == "textbook" else sq.sum(dim=(1, 2)).mean()
    torch.testing.assert_close(out.losses["commitment"], 0.25 * want)
    (gz,) = torch.autograd.grad(out.z_q.sum(), z)
    torch.testing.assert_close(gz, torch.ones_like(z))


def test_vq_ema_textbook_commitment_is_a_mean_over_valid_elements():
    """Padded batch == its valid positions laid end to end: the textbook mean counts valid elements only."""
    q = make("vq_ema", vq_objective="textbook").eval()
    (za, _), (zb, _), (z, _, mask) = _padded_pair(q)
    cat = q(torch.cat([za, zb], -1))
    torch.testing.assert_close(q(z, None, mask).losses["commitment"], cat.losses["commitment"])


def test_vq_ema_update_moves_codes_to_assigned_means():
    q = make("vq_ema", vq_decay=0.0, vq_epsilon=1e-8).train()
    z, _ = inputs(q, (4, 8), scale=0.01)
    before = q.codebook.clone()
    out = q(z)
    x = z.detach().movedim(1, -1).reshape(-1, D)
    codes = out.codes.flatten()
    for k in codes.unique().tolist():
        mean = x[codes == k].mean(0)
        torch.testing.assert_close(q.codebook[k], mean, rtol=1e-5, atol=1e-9)
        assert (q.codebook[k] - mean).norm() < (before[k] - mean).norm()
    q.eval()
    frozen = q.codebook.clone()
    q(z)
    assert torch.equal(q.codebook, frozen)                    # no update at inference


def test_vq_ema_update_formula_with_decay():
    q = make("vq_ema", vq_decay=0.9, vq_epsilon=1e-5).train()
    count0, weight0 = q.ema_count.clone(), q.ema_weight.clone()
    z, _ = inputs(q, (2, 6), scale=0.01)
    codes = q(z).codes.flatten()
    x = z.detach().movedim(1, -1).reshape(-1, D)
    n_k = torch.stack([(codes == k).sum() for k in range(K)]).double()
    sums = torch.stack([x[codes == k].sum(0) for k in range(K)])
    count = 0.9 * count0 + 0.1 * n_k
    count = (count + 1e-5) / (count.sum() + K * 1e-5) * count.sum()
    weight = 0.9 * weight0 + 0.1 * sums
    torch.testing.assert_close(q.ema_count, count)
    torch.testing.assert_close(q.codebook, weight / count.unsqueeze(1))


def test_vq_ema_padding_does_not_touch_codebook():
    q = make("vq_ema", vq_decay=0.8).train()
    (za, _), (zb, _), (z, _, mask) = _padded_pair(q)
    q(z, None, mask)
    padded = {k: v.clone() for k, v in q.state_dict().items()}
    q.load_state_dict(make("vq_ema", vq_decay=0.8).state_dict())
    q(torch.cat([za, zb], -1))
    for name, value in q.state_dict().items():
        torch.testing.assert_close(value, padded[name])


def _with_dead_codes(q):
    """Codes 3.. far away and rarely used (N_k = 0.01): dead under a reset threshold of 0.05."""
    with torch.no_grad():
        q.codebook[3:] += 100.0
        q.ema_count.fill_(1.0)
        q.ema_count[3:] = 0.01
        q.ema_weight.copy_(q.codebook * q.ema_count.unsqueeze(1))
    return q


def test_vq_ema_dead_code_reset():
    q = _with_dead_codes(make("vq_ema", vq_decay=0.9, vq_reset_threshold=0.05).train())
    (za, _), (zb, _), (z, _, mask) = _padded_pair(q, fill=1e3)
    torch.manual_seed(0)
    q(z, None, mask)
    valid = z.detach().movedim(1, -1)[mask]                   # (M, D) valid encoder outputs
    for k in range(K):
        matches = (q.codebook[k] - valid).abs().max(1).values < 1e-12
        assert bool(matches.any()) == (k >= 3), k            # dead codes now sit on valid encoder outputs
    assert (q.ema_count[3:] == 0.05).all()
    torch.testing.assert_close(q.ema_weight[3:], q.codebook[3:] * 0.05)
    off = _with_dead_codes(make("vq_ema", vq_decay=0.9).train())
    off(z, None, mask)
    assert (off.codebook[3:].abs() > 50).all()                # without reset they stay dead
    for name in ["codebook", "ema_weight", "ema_count"]:      # live codes: exactly the plain EMA update
        assert torch.equal(getattr(q, name)[:3], getattr(off, name)[:3]), name
    assert q.codebook[3:].unique(dim=0).shape[0] > 1          # each dead code draws its own row


def test_vq_ema_reset_without_valid_positions_changes_nothing():
    q = _with_dead_codes(make("vq_ema", vq_decay=0.9, vq_reset_threshold=0.05).train())
    off = _with_dead_codes(make("vq_ema", vq_decay=0.9).train())
    _, _, (z, _, mask) = _padded_pair(q, fill=float("nan"))
    with torch.no_grad():
        z.fill_(float("nan"))
    for quantizer in (q, off):
        quantizer(z, None, torch.zeros_like(mask))
    for name in ["codebook", "ema_weight", "ema_count"]:
        assert torch.isfinite(getattr(q, name)).all() and torch.equal(getattr(q, name), getattr(off, name)), name
    assert (q.ema_count[3:] < 0.05).all()                     # still dead: nothing to reset them to


def test_vq_ema_update_equals_the_boolean_indexed_formula():
    """Masks enter as weights: the EMA statistics equal those of the valid rows selected by boolean indexing."""
    q = make("vq_ema", vq_decay=0.9, vq_epsilon=1e-5).train()
    count0, weight0 = q.ema_count.clone(), q.ema_weight.clone()
    _, _, (z, _, mask) = _padded_pair(q, fill=1e3)
    codes = q(z, None, mask).codes[mask]                      # (M,) codes of the valid positions
    x = z.detach().movedim(1, -1)[mask]                       # (M, D)
    onehot = F.one_hot(codes, K).to(x.dtype)
    count = 0.9 * count0 + (1 - 0.9) * onehot.sum(0)
    total = count.sum()
    count = (count + 1e-5) / (total + K * 1e-5) * total
    weight = weight0 * 0.9 + (1 - 0.9) * (onehot.t() @ x)
    assert torch.equal(q.ema_count, count)
    torch.testing.assert_close(q.ema_weight, weight, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(q.codebook, weight / count.unsqueeze(1), rtol=1e-14, atol=1e-16)


class HostReads(TorchDispatchMode):
    """Records the aten ops that read tensor values on the host (a device synchronisation on CUDA)."""

    READS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::item",
             "aten::is_nonzero", "aten::equal", "aten::_unique2", "aten::unique_consecutive"}
    INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masks = name in self.INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                              for i in args[1])
        if name in self.READS or masks:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def test_host_read_probe_sees_masks_and_scalars():
    x = torch.arange(4.0)
    with HostReads() as probe:
        x[x > 1].sum(), int(x.sum()), x.nonzero()
    assert len(probe.found) == 3, probe.found


@pytest.mark.parametrize("reset", [0.0, 0.05])
def test_vq_ema_training_step_reads_no_tensor_on_the_host(reset):
    q = _with_dead_codes(make("vq_ema", vq_decay=0.9, vq_reset_threshold=reset).train())
    _, _, (z, _, mask) = _padded_pair(q)
    with HostReads() as probe:
        out = q(z, None, mask)
        sum(out.losses.values()).backward()
    assert probe.found == []
    assert z.grad is not None and (q.ema_count >= reset).all()   # with a threshold the dead codes were reset


# ---------------------------------------------------------------- fixed variance, vMF
def test_fixed_gaussian_has_no_trainable_variance():
    q = make("fixed_gaussian", variant=1, var_init=3.0).train()
    assert isinstance(q, FixedGaussianSQ) and [n for n, _ in q.named_parameters()] == ["codebook"]
    z, _ = inputs(q)
    out = q(z, temperature=0.5)
    sum(out.losses.values()).backward()
    assert out.stats["var_q"].item() == pytest.approx(3.0)
    assert q.log_var_scalar.grad is None
    with pytest.raises(UserError, match="variant 1"):
        make("fixed_gaussian", variant=3)


def reference_vmf(q, z, noise=None, tau=1.0):
    x = F.normalize(z.movedim(1, -1).reshape(-1, q.dim), dim=-1)
    cb = q.codebook / q.codebook.norm(dim=1, keepdim=True)
    kappa = q.log_kappa_scalar.exp() + 1
    logits = kappa * x @ cb.t()
    if noise is None:
        z_q = cb[logits.argmax(-1)]
    else:
        eps = torch.finfo(logits.dtype).eps
        z_q = torch.softmax((logits - torch.log(-torch.log(noise.clamp(eps, 1 - eps)))) / tau, -1) @ cb
    b = z.shape[0]
    p = torch.softmax(logits, -1)
    ent = (p * torch.log(p)).reshape(b, -1).sum(1).mean()
    dist = (kappa * (x * (x - z_q)).sum(-1)).reshape(b, -1).sum(1).mean()
    return dist, ent, z_q, kappa


@pytest.mark.parametrize("training", [False, True])
def test_vmf_loss_equals_formula(training):
    q = make("vmf", var_init=5.0).train(training)
    z, _ = inputs(q, (2, 3, 2))
    torch.manual_seed(9)
    out = q(z, temperature=0.8)
    torch.manual_seed(9)
    noise = torch.rand(12, K, dtype=torch.float64) if training else None
    dist, ent, z_q, kappa = reference_vmf(q, z, noise, 0.8)
    torch.testing.assert_close(out.losses["latent_distance"], dist)
    torch.testing.assert_close(out.losses["latent_entropy"], ent)
    torch.testing.assert_close(out.z_q.movedim(1, -1).reshape(-1, D), z_q)
    assert out.stats["var_q"].item() == pytest.approx(6.0)
    if not training:
        torch.testing.assert_close(q.lookup(out.codes), out.z_q)


# ---------------------------------------------------------------- interface details
@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_eval_lookup_reproduces_z_q(kind):
    q = make(kind, variant=1 if kind == "fixed_gaussian" else 4).eval()
    z, v = inputs(q, (2, 3, 4))
    out = q(z, v)
    assert out.codes.shape == (2, 3, 4) and out.codes.dtype == torch.long
    torch.testing.assert_close(q.lookup(out.codes), out.z_q.detach())


def test_sample_at_inference_draws_from_p_hat():
    q = make(variant=1, var_init=100.0, sample_at_inference=True).eval()
    z, _ = inputs(q, (4, 50))
    torch.manual_seed(0)
    a = q(z)
    torch.manual_seed(1)
    b = q(z)
    assert not torch.equal(a.codes, b.codes)                       # stochastic
    torch.testing.assert_close(q.lookup(a.codes), a.z_q.detach())  # z_q is the sampled code
    q.sample_at_inference = False
    assert torch.equal(q(z).codes, q(z).codes)


def test_autocast_runs_quantizer_in_float32():
    q = build_quantizer(QuantizerConfig(variant=4, codebook_size=K, dim=D)).eval()
    z = torch.randn(2, D, 5)
    v = torch.randn(2, D, 5)
    ref = q(z, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16(), v.bfloat16())
    assert out.z_q.dtype == torch.float32 and out.losses["latent_distance"].dtype == torch.float32
    ref16 = q(z.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(out.losses["latent_distance"], ref16.losses["latent_distance"])
    assert torch.isfinite(ref.losses["latent_distance"])


def test_bad_config_and_shapes():
    with pytest.raises(UserError, match="gaussian, fixed_gaussian, vq_ema, vmf"):
        build_quantizer(QuantizerConfig(kind="nope"))
    for bad in ({"variant": 5}, {"var_combine": "mul"}, {"var_init": 0.0}):
        with pytest.raises(UserError, match="quantizer."):
            build_quantizer(dataclasses.replace(QuantizerConfig(), **bad))
    with pytest.raises(UserError, match="vq_decay"):
        build_quantizer(QuantizerConfig(kind="vq_ema", vq_decay=1.0))
    with pytest.raises(UserError, match="textbook, mle_sigma"):
        build_quantizer(QuantizerConfig(kind="vq_ema", vq_objective="ml"))
    q = make(variant=4)
    with pytest.raises(ValueError, match="var_logits"):
        q(torch.randn(1, D, 3, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="z must be"):
        q(torch.randn(1, D + 1, 3, dtype=torch.float64))
    assert isinstance(make(), GaussianSQ) and isinstance(make("vmf"), VmfSQ) and isinstance(make("vq_ema"), VQEMA)


def test_harmonic_variance_is_one_over_mean_precision():
    q = build_quantizer(QuantizerConfig(kind="gaussian", variant=4, codebook_size=8, dim=4, var_init=1.0)).eval()
    log_var = torch.tensor([0.0, 0.0, 0.0, 9.0]).view(1, 4, 1).expand(2, 4, 3)  # one dimension nearly unused
    out = q(torch.randn(2, 4, 3), var_logits=log_var)
    var = torch.exp(log_var)
    assert out.stats["var_q"].item() == pytest.approx(var.mean().item(), rel=1e-5)
    assert out.stats["var_q_harmonic"].item() == pytest.approx(1 / (1 / var).mean().item(), rel=1e-5)
    assert out.stats["var_q_harmonic"] < 1.4 < out.stats["var_q"]
