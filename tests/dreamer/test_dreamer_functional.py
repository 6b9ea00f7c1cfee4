"""Exact-value tests of the DreamerV3 math against naive references."""
import math

import pytest
import torch

from torchrl_dreamer.dreamer.functional import (
    ReturnNormalizer,
    TwoHot,
    kl_loss,
    lambda_returns,
    symexp,
    symlog,
    unimix_masked_probs,
)


def test_symlog_symexp_values_and_round_trip():
    x = torch.tensor([-1000.0, -2.5, -1e-3, 0.0, 1e-3, 1.0, 7.0, 1e4], dtype=torch.float64)
    expected = torch.tensor([math.copysign(math.log1p(abs(v)), v) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(symlog(x), expected)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-12)


def _bin_units(codec, x):
    return symlog(x) if codec.space == "symlog" else x


@pytest.mark.parametrize("space", TwoHot.SPACES)
def test_two_hot_encode_decode_round_trip_and_loss(space):
    codec = TwoHot(num_bins=255, space=space).double()
    targets = torch.tensor([-300.0, -1.0, 0.0, 0.37, 5.0, 1234.5], dtype=torch.float64)
    w = codec.encode(targets)
    assert torch.allclose(w.sum(-1), torch.ones(6, dtype=torch.float64))
    assert ((w > 0).sum(-1) <= 2).all()
    # expected bin == the target in bin units (symlog(target) or target) exactly, inside the range
    assert torch.allclose((w * codec.bins).sum(-1), _bin_units(codec, targets))
    # decoding logits that put exactly these weights back gives the target
    logits = torch.log(w.clamp_min(1e-300))
    assert torch.allclose(codec.decode(logits), targets, rtol=1e-9)
    # loss = cross-entropy with the two-hot target (naive)
    raw = torch.randn(6, 255, dtype=torch.float64)
    naive = torch.stack([-(w[i] * torch.log_softmax(raw[i], -1)).sum() for i in range(6)])
    assert torch.allclose(codec.loss(raw, targets), naive)
    # outside the range: all weight on the edge bin
    edge = codec.encode(torch.tensor([1e12], dtype=torch.float64))
    assert edge[0, -1] == 1.0


def _naive_lambda_returns(reward, cont, value, discount, lmbda):
    B, H = reward.shape
    out = torch.zeros(B, H, dtype=value.dtype)
    for b in range(B):
        nxt = value[b, H]
        for t in reversed(range(H)):
            nxt = reward[b, t] + discount * cont[b, t] * ((1 - lmbda) * value[b, t + 1] + lmbda * nxt)
            out[b, t] = nxt
    return out


def test_lambda_returns_match_naive_loop_including_termination():
    g = torch.Generator().manual_seed(0)
    reward = torch.randn(4, 15, generator=g, dtype=torch.float64)
    cont = torch.ones(4, 15, dtype=torch.float64)
    cont[1, 6] = 0.0  # terminal mid-horizon: nothing after step 6 leaks into earlier returns
    value = torch.randn(4, 16, generator=g, dtype=torch.float64)
    ours = lambda_returns(reward, cont, value, discount=0.997, lmbda=0.95)
    assert torch.allclose(ours, _naive_lambda_returns(reward, cont, value, 0.997, 0.95))
    assert ours[1, 6] == pytest.approx(reward[1, 6].item())  # R_6 = r_7 when s_7 is terminal
    # lambda = 0 is one-step TD bootstrapping from V(s_{t+1}), never V(s_t)
    td0 = lambda_returns(reward, cont, value, discount=0.9, lmbda=0.0)
    assert torch.allclose(td0, reward + 0.9 * cont * value[:, 1:])
    with pytest.raises(ValueError, match="value \\[B, H\\+1\\]"):
        lambda_returns(reward, cont, value[:, :-1])


def test_kl_balancing_routes_gradients():
    torch.manual_seed(0)
    post = torch.randn(2, 3, 4, 5, requires_grad=True)
    prior = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = kl_loss(post, prior, dyn_scale=1.0, rep_scale=0.0, free_bits=0.0)
    g_post, g_prior = torch.autograd.grad(out["loss"], [post, prior])
    assert g_post.abs().max() == 0 and g_prior.abs().max() > 0  # dyn moves only the prior
    out = kl_loss(post, prior, dyn_scale=0.0, rep_scale=1.0, free_bits=0.0)
    g_post, g_prior = torch.autograd.grad(out["loss"], [post, prior])
    assert g_prior.abs().max() == 0 and g_post.abs().max() > 0  # rep moves only the posterior
    # value: KL summed over the 4 latents, averaged over (batch, time)
    p, q = torch.softmax(post, -1), torch.softmax(prior, -1)
    naive = (p * (p.log() - q.log())).sum((-1, -2)).mean()
    assert out["kl_raw"].item() == pytest.approx(naive.item(), rel=1e-5)


def test_free_bits_gradient_clip_vs_straight_through():
    post = torch.zeros(1, 1, 2, 4, requires_grad=True)
    prior = (torch.zeros(1, 1, 2, 4) + torch.tensor([0.1, 0.0, 0.0, 0.0])).requires_grad_()  # KL << 1 nat
    clip = kl_loss(post, prior, free_bits=1.0, free_bits_grad="clip")
    assert clip["dyn"].item() == 1.0  # clipped value
    (g_clip,) = torch.autograd.grad(clip["loss"], [prior])
    assert g_clip.abs().max() == 0  # the paper's clip: no gradient below 1 nat (on purpose)
    st = kl_loss(post, prior, free_bits=1.0, free_bits_grad="straight_through")
    assert st["dyn"].item() == 1.0
    (g_st,) = torch.autograd.grad(st["loss"], [prior])
    assert g_st.abs().max() > 0  # straight-through keeps the raw KL gradient
    far = (torch.zeros(1, 1, 2, 4) + torch.tensor([8.0, 0.0, 0.0, 0.0])).requires_grad_()
    above = kl_loss(post, far, free_bits=1.0, free_bits_grad="clip")
    (g_above,) = torch.autograd.grad(above["loss"], [far])
    assert above["dyn"].item() > 1.0 and g_above.abs().max() > 0  # above the threshold both train


def _naive_unimix_masked_probs(logits, mask, unimix):
    """Reference: per row, a softmax over the allowed actions only (plain Python floats), mixed with
    ``unimix`` spread uniformly over those actions; masked actions get 0."""
    rows = []
    for row_logits, row_mask in zip(logits.double().tolist(), mask.tolist()):
        allowed = [i for i, ok in enumerate(row_mask) if ok]
        top = max(row_logits[i] for i in allowed)
        weights = {i: math.exp(row_logits[i] - top) for i in allowed}
        total = sum(weights.values())
        rows.append([(1 - unimix) * weights[i] / total + unimix / len(allowed) if ok else 0.0
                     for i, ok in enumerate(row_mask)])
    return torch.tensor(rows, dtype=torch.float64)


def test_unimix_then_mask_gives_exact_zero_and_finite_log_probs():
    logits = torch.tensor([[50.0, 0.0, -50.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 4.0]])
    mask = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, True, True]])
    p = unimix_masked_probs(logits, mask, unimix=0.01)
    torch.testing.assert_close(p.double(), _naive_unimix_masked_probs(logits, mask, 0.01), rtol=1e-6, atol=1e-7)
    assert (p[~mask] == 0).all()  # masked: exactly zero, not 0.01 / K
    assert (p[0, [0, 2, 3]] >= 0.01 / 3 - 1e-7).all()  # every allowed action keeps unimix / n_allowed
    assert torch.isfinite(p[mask].log()).all()  # near-deterministic policy, finite log-probs
    assert p[1, 2] == 1.0
    # without a mask (or with every action allowed): mixing over all K actions
    torch.testing.assert_close(unimix_masked_probs(logits[2:], None, unimix=0.01).double(),
                               _naive_unimix_masked_probs(logits[2:], mask[2:], 0.01), rtol=1e-6, atol=1e-7)
    # a larger random batch, another mixing fraction
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 9, generator=g) * 5
    mask = torch.rand(64, 9, generator=g) > 0.4
    mask[:, 3] = True
    torch.testing.assert_close(unimix_masked_probs(logits, mask, unimix=0.1).double(),
                               _naive_unimix_masked_probs(logits, mask, 0.1), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no allowed action"):
        unimix_masked_probs(logits, torch.zeros_like(mask))


def test_masked_node_never_sampled_in_10k_draws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10_000, 20, generator=g) * 10
    mask = torch.rand(10_000, 20, generator=g) > 0.5
    mask[:, 0] = True
    p = unimix_masked_probs(logits, mask)
    draws = torch.multinomial(p, 1, generator=g).squeeze(1)
    assert mask.gather(1, draws[:, None]).all()


def test_return_normalizer_ema_against_naive():
    norm = ReturnNormalizer(decay=0.99)
    lo = hi = 0.0
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        r = torch.randn(1000, generator=g) * 50
        norm.update(r)
        lo = 0.99 * lo + 0.01 * torch.quantile(r, 0.05).item()
        hi = 0.99 * hi + 0.01 * torch.quantile(r, 0.95).item()
    assert norm.low.item() == pytest.approx(lo, rel=1e-5) and norm.high.item() == pytest.approx(hi, rel=1e-5)
    assert norm.scale.item() == pytest.approx(max(1.0, hi - lo), rel=1e-5)
    small = ReturnNormalizer()
    small.update(torch.randn(100) * 1e-3)
    assert small.scale.item() == 1.0  # never divides advantages by less than 1


@pytest.mark.parametrize("space", TwoHot.SPACES)
def test_two_hot_loss_compiled_form_equals_gather_form_values_and_gradients(space):
    """Under torch.compile the loss uses dense "tent" weights max(0, 1 - |i - position|) instead of
    a gather (whose backward is a scatter); same loss and same logits gradient, edge bins and
    out-of-range targets included (symexp bins: uneven widths on the two sides of a bin)."""
    codec = TwoHot(num_bins=255, space=space)
    torch.manual_seed(0)
    targets = torch.tensor([-1e9, -300.0, -1.0, 0.0, 0.37, 5.0, 1234.5, 1e9, symexp(torch.tensor(-20.0 + 7 * 40 / 254)).item()])
    targets = torch.cat([targets, symexp(torch.randn(40) * 4)])
    raw = torch.randn(len(targets), 255)
    results = []
    for fn in (codec.loss, torch.compile(codec.loss, dynamic=False)):
        logits = raw.clone().requires_grad_(True)
        loss = fn(logits, targets)
        loss.sum().backward()
        results.append((loss.detach(), logits.grad))
    (l0, g0), (l1, g1) = results
    naive = -(codec.encode(targets) * torch.log_softmax(raw, -1)).sum(-1)
    torch.testing.assert_close(l0, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    # the interpolation weight is rounded differently (bucketize + ratio vs distance to the bin):
    # float32 differences up to ~ulp(20) / bin width ~ 1e-5
    torch.testing.assert_close(g1, g0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g0, torch.softmax(raw, -1) - codec.encode(targets), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("space", TwoHot.SPACES)
def test_two_hot_mixture_loss_equals_the_weighted_sum_of_single_losses(space):
    """The critic's two targets (lambda-return and slow critic) share one logsumexp: the mixture
    loss equals ``loss(l, a) + s * loss(l, b)`` in value and logits gradient, eager and compiled;
    mismatched scales are refused."""
    codec = TwoHot(num_bins=255, space=space)
    torch.manual_seed(1)
    a = symexp(torch.randn(6, 7) * 4)
    b = symexp(torch.randn(6, 7) * 4)
    a[0, 0], b[0, 1] = 1e9, -1e9  # out of range: edge bins
    raw = torch.randn(6, 7, 255)

    def reference(logits):
        return codec.loss(logits, a) + 0.7 * codec.loss(logits, b)

    results = []
    for fn in (reference, lambda lg: codec.mixture_loss(lg, (a, b), (1.0, 0.7)),
               torch.compile(lambda lg: codec.mixture_loss(lg, (a, b), (1.0, 0.7)), dynamic=False)):
        logits = raw.clone().requires_grad_(True)
        loss = fn(logits)
        loss.sum().backward()
        results.append((loss.detach(), logits.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grad, results[0][1], atol=3e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="as many scales"):
        codec.mixture_loss(raw, (a, b), (1.0,))


@pytest.mark.parametrize("space", TwoHot.SPACES)
def test_two_hot_decode_and_lse_compiled_form_equals_softmax_and_logsumexp(space):
    """``decode_and_lse`` (the critic's value and log-normaliser of the same logits): eager it is
    ``symexp(softmax @ bins)`` and ``logsumexp``; compiled, both come from one ``exp(l - max)``
    with the max detached. Values and logits gradients agree (the gradient through the detached
    max is zero in exact arithmetic), including large logits where a plain ``exp`` overflows; a
    precomputed ``lse`` of the wrong shape is refused by ``mixture_loss``. Symexp bins: the mean
    of ``softmax`` over the raw-unit bins (in float64 for the reference)."""
    codec = TwoHot(num_bins=255, space=space)
    torch.manual_seed(2)
    raw = torch.randn(5, 6, 255) * 3
    raw[0, 0] += 200.0  # exp(200) overflows float32 without the shift
    weights = torch.randn(5, 6)

    def run(fn):
        logits = raw.clone().requires_grad_(True)
        value, lse = fn(logits)
        ((value * weights).sum() + (lse * weights.flip(0)).sum()).backward()
        return value.detach(), lse.detach(), logits.grad

    if space == "symlog":
        ref = run(lambda lg: (symexp(torch.softmax(lg, -1) @ codec.bins), torch.logsumexp(lg, -1)))
    else:
        ref = run(lambda lg: ((torch.softmax(lg.double(), -1) @ codec.bins.double()).float(), torch.logsumexp(lg, -1)))
    for fn in (codec.decode_and_lse, torch.compile(codec.decode_and_lse, dynamic=False)):
        value, lse, grad = run(fn)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value, ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=1e-5)
        # symexp: the value's gradient is softmax * (bins - value) with bins up to 5e8 (float32 rounding)
        torch.testing.assert_close(grad, ref[2], atol=1e-5, rtol=1e-4 if space == "symlog" else 1e-3)
    compiled_decode = torch.compile(codec.decode, dynamic=False)
    torch.testing.assert_close(compiled_decode(raw), ref[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="lse must have shape"):
        codec.mixture_loss(raw, (weights,), (1.0,), lse=torch.zeros(5))


def test_two_hot_symexp_decodes_the_mean_and_zero_at_init():
    """Symexp bins decode to the predicted distribution's mean, where symlog bins decode to the
    symexp of the mean bin: for a reward of -100 with probability 0.2 and 0 otherwise (the two-hot
    targets' mixture), -20 against symexp(0.2 * symlog(-100)) = -1.517. All-equal logits (the
    zero-initialised head) decode to exactly 0 eager and compiled (mirror-paired sum), and the
    bins are an exact mirror image; an unknown space is refused."""
    for space, expected in (("symexp", -20.0), ("symlog", -1.5169)):
        codec = TwoHot(num_bins=255, space=space)
        mix = 0.2 * codec.encode(torch.tensor([-100.0]))[0] + 0.8 * codec.encode(torch.tensor([0.0]))[0]
        assert codec.decode(torch.log(mix.clamp_min(1e-30))).item() == pytest.approx(expected, abs=1e-3)
    # the symlog bins stay float32 linspace to the bit (checkpoints and seeded runs of earlier versions)
    assert torch.equal(TwoHot(num_bins=255).bins, torch.linspace(-20.0, 20.0, 255))
    codec = TwoHot(num_bins=255, space="symexp")
    assert torch.equal(codec.bins, -codec.bins.flip(0)) and codec.bins[127] == 0 and codec.bins[-1] > 4e8
    flat = torch.zeros(3, 255)
    assert torch.equal(codec.decode(flat), torch.zeros(3))
    assert torch.equal(torch.compile(codec.decode, dynamic=False)(flat), torch.zeros(3))
    assert torch.equal(TwoHot(num_bins=256, space="symexp").decode(torch.zeros(256)), torch.tensor(0.0))
    with pytest.raises(ValueError, match="space must be one of"):
        TwoHot(space="linear")
    # a checkpoint of the other spacing is refused with the option's name, the same one loads
    codec.load_state_dict(TwoHot(num_bins=255, space="symexp").state_dict())
    with pytest.raises(RuntimeError, match="model.twohot"):
        codec.load_state_dict(TwoHot(num_bins=255, space="symlog").state_dict())
