"""RSSM groundwork: shapes, is_first resets, unimix floor, straight-through gradients."""
import pytest
import torch
import torch.nn.functional as F

from torchrl_dreamer.dreamer.rssm import RSSM


def _rssm():
    torch.manual_seed(0)
    return RSSM(action_dim=3, embed_dim=10, deter=32, stoch=4, classes=5, hidden=16, blocks=4)


def test_observe_shapes_and_unimix_floor():
    rssm = _rssm()
    out = rssm.observe(torch.randn(2, 6, 10), torch.randn(2, 6, 3), torch.zeros(2, 6, dtype=torch.bool))
    assert out["deter"].shape == (2, 6, 32)
    assert out["stoch"].shape == out["posterior_logits"].shape == out["prior_logits"].shape == (2, 6, 4, 5)
    assert (out["posterior_logits"].exp() >= 0.01 / 5 - 1e-6).all()  # 1% unimix floor
    assert torch.allclose(out["stoch"].sum(-1), torch.ones(2, 6, 4))


def test_is_first_resets_state_and_previous_action():
    rssm = _rssm()
    embed, action = torch.randn(2, 6, 10), torch.randn(2, 6, 3)
    is_first = torch.zeros(2, 6, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, 3] = True  # a new episode starts at t=3 in row 0
    out = rssm.observe(embed, action, is_first)
    fresh = rssm.observe(embed[:, 3:], action[:, 3:], torch.ones(2, 3, dtype=torch.bool))
    # right after a reset h depends only on the initial state (zero previous action)
    assert torch.allclose(out["deter"][0, 3], fresh["deter"][0, 0], atol=1e-6)
    assert not torch.allclose(out["deter"][1, 3], fresh["deter"][1, 0], atol=1e-3)


def test_straight_through_sample_passes_gradients():
    rssm = _rssm()
    logits = torch.randn(3, 4, 5, requires_grad=True)
    z = rssm.sample(torch.log_softmax(logits, -1))
    assert torch.allclose(z.detach(), z.detach().round(), atol=1e-6)  # a one-hot in value
    (z * torch.randn_like(z)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_compiled_scan_equals_the_eager_scan_values_and_gradients():
    """enable_compile(mode="scan"): one graph for the whole loop, resets as masks on every step;
    same outputs and parameter gradients as the eager loop (which branches on the reset pattern)."""
    eager, compiled = _rssm(), _rssm()
    compiled.enable_compile(mode="scan")
    embed, action = torch.randn(2, 5, 10), torch.randn(2, 5, 3)
    is_first = torch.zeros(2, 5, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[1, 2] = True
    outs, grads = [], []
    for rssm in (eager, compiled):
        torch.manual_seed(7)  # the Gumbel noise is drawn outside the compiled loop: same samples
        out = rssm.observe(embed, action, is_first)
        loss = out["deter"].pow(2).sum() + (out["stoch"] * out["posterior_logits"]).sum()
        grads.append(torch.autograd.grad(loss, [p for p in rssm.parameters()], allow_unused=True))
        outs.append(out)
    for key in ("deter", "stoch", "posterior_logits", "prior_logits"):
        torch.testing.assert_close(outs[1][key], outs[0][key], atol=1e-5, rtol=1e-4)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="compile mode"):
        eager.enable_compile(mode="graph")


def test_prior_sample_is_a_sample_of_the_unimixed_prior():
    """RSSM.prior_sample (imagination's sampler) draws the unimix mixture directly: with the
    mixture uniform >= unimix it is Gumbel-max on the raw prior logits, below it the class
    floor(mix / unimix * C); frequencies follow the unimixed probabilities (a class with no
    softmax mass keeps unimix / C); without autograd it is an exact one-hot, with it the
    straight-through gradient reaches the prior net."""
    rssm = _rssm()
    torch.manual_seed(0)
    h = torch.randn(64, rssm.deter)
    gumbel = -torch.log(-torch.log(torch.rand(64, rssm.stoch, rssm.classes).clamp(1e-20, 1 - 1e-7)))
    with torch.no_grad():
        raw = rssm.prior_net(h).reshape(64, rssm.stoch, rssm.classes)
        z = rssm.prior_sample(h, (gumbel, torch.ones(64, rssm.stoch)))  # never the uniform branch
        assert torch.equal(z.argmax(-1), (raw + gumbel).argmax(-1))
        assert torch.equal(z, F.one_hot(z.argmax(-1), rssm.classes).float())
        # below unimix: class floor(mix / unimix * C), whatever the logits say
        mix = torch.full((64, rssm.stoch), 0.999 * rssm.unimix)
        assert (rssm.prior_sample(h, (gumbel, mix)).argmax(-1) == rssm.classes - 1).all()
        assert (rssm.prior_sample(h, (gumbel, torch.zeros(64, rssm.stoch))).argmax(-1) == 0).all()
    # empirical frequencies follow the unimixed prior's probabilities
    with torch.no_grad():
        draws = torch.stack([rssm.prior_sample(h[:1]) for _ in range(4000)])
        probs = rssm.prior_logits(h[:1]).exp()
    torch.testing.assert_close(draws.mean(0), probs, atol=0.03, rtol=0)
    # a class with (nearly) zero softmax mass keeps exactly unimix / C
    rssm_peaked = _rssm()
    with torch.no_grad():
        rssm_peaked.prior_net[-1].weight.zero_()
        rssm_peaked.prior_net[-1].bias.copy_(torch.tensor([50.0] + [0.0] * (rssm.classes - 1)).repeat(rssm.stoch))
        many = torch.stack([rssm_peaked.prior_sample(h[:1]) for _ in range(20000)]).mean(0)
    torch.testing.assert_close(many[..., 1:], torch.full_like(many[..., 1:], rssm.unimix / rssm.classes),
                               atol=2e-3, rtol=0)
    z = rssm.prior_sample(h)
    (z * torch.randn_like(z)).sum().backward()
    assert rssm.prior_net[0].weight.grad.abs().sum() > 0
