"""Dreamer world model, imagination and losses: contracts, gradient routing and exact values."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from torchrl_dreamer.dreamer.agent import make_agent, preset
from torchrl_dreamer.dreamer.functional import lambda_returns
from torchrl_dreamer.dreamer.imagination import ImaginationModule, imagine
from torchrl_dreamer.dreamer.losses import (
    DreamerCriticLoss, DreamerPolicyLoss, DreamerWorldModelLoss, imagination_weight, per_trajectory,
)
from torchrl_dreamer.dreamer.nets import DiscreteActor, OneHotDist
from torchrl_dreamer.dreamer.update import DreamerUpdate, make_optimizer
from torchrl_dreamer.guards import NonFiniteError

SIZES = preset("tiny", deter=32, hidden=16, units=16, stoch=4, classes=4, blocks=2, bins=31)
B, T, H = 3, 7, 4


def _agent(discrete=True, obs_dim=5, action_dim=3, twohot="symlog"):
    torch.manual_seed(0)
    return make_agent({"observation": (obs_dim,)}, action_dim, discrete, replace(SIZES, twohot=twohot))


def _batch(obs_dim=5, action_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    action = F.one_hot(torch.randint(0, action_dim, (B, T), generator=g), action_dim).float()
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[1, 4] = True
    is_terminal = torch.zeros(B, T, dtype=torch.bool)
    is_terminal[1, 3] = True
    return TensorDict({
        "observation": torch.randn(B, T, obs_dim, generator=g), "action": action,
        "reward": torch.randn(B, T, generator=g), "is_first": is_first, "is_terminal": is_terminal,
    }, [B, T])


def _losses(agent):
    wm = DreamerWorldModelLoss(agent.world_model)
    critic = DreamerCriticLoss(agent.critic)
    actor = DreamerPolicyLoss(agent.actor)
    for loss in (critic, actor):
        loss.make_value_estimator(gamma=0.99, lmbda=0.9)
    return wm, critic, actor


def _snapshot(td):
    return {k: v.clone() for k, v in td.items(include_nested=True, leaves_only=True)}


def test_world_model_loss_contract_and_weights():
    agent = _agent()
    wm, _, _ = _losses(agent)
    batch = _batch()
    before = _snapshot(batch)
    loss_td, states = wm(batch)
    # no mutation of the input
    assert set(batch.keys()) == set(before) and all(torch.equal(batch[k], v) for k, v in before.items())
    # the named weights are the ones actually applied (danijar's check)
    wm2 = DreamerWorldModelLoss(agent.world_model, dyn_scale=1.0, rep_scale=1.0)
    torch.manual_seed(1)
    l1, _ = wm(batch)
    torch.manual_seed(1)
    l2, _ = wm2(batch)
    assert l1["loss_dyn"].item() == pytest.approx(0.5 * l2["loss_dyn"].item(), rel=1e-5)
    assert l1["loss_rep"].item() == pytest.approx(0.1 * l2["loss_rep"].item(), rel=1e-5)
    trainable = {k for k in loss_td.keys() if k.startswith("loss_")}
    assert trainable == {"loss_reconstruction", "loss_reward", "loss_continue", "loss_dyn", "loss_rep"}
    assert all(not loss_td[k].requires_grad for k in loss_td.keys() if not k.startswith("loss_"))
    assert states.batch_size == (B, T) and not states["deter"].requires_grad
    # set_keys renames what is read
    renamed = batch.clone().rename_key_("observation", "obs").rename_key_("is_first", "first")
    wm.set_keys(observation="obs", is_first="first")
    torch.manual_seed(1)
    l3, _ = wm(renamed)
    assert l3["loss_reconstruction"].item() == pytest.approx(l1["loss_reconstruction"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="not an accepted tensordict key"):
        wm.set_keys(nonsense="x")
    with pytest.raises(KeyError):
        wm(batch)  # still looking for "obs"


def test_world_model_loss_shape_errors():
    agent = _agent()
    wm, _, _ = _losses(agent)
    batch = _batch()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        wm(batch.reshape(-1))
    bad = batch.clone()
    bad["is_first"] = torch.zeros(B, T, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="is_first"):
        wm(bad)
    bad = batch.clone()
    bad["observation"] = torch.randn(B, T, 4)
    with pytest.raises(ValueError, match="VectorEncoder expects"):
        wm(bad)


def test_continue_target_and_terminal_row():
    agent = _agent()
    wm, _, _ = _losses(agent)
    batch = _batch()
    loss_td, states = wm(batch)
    # continue loss is BCE against 1 - is_terminal: recompute by hand
    feat = states["feat"]
    logit = agent.world_model.continue_head(feat)
    target = 1.0 - batch["is_terminal"].float()
    naive = F.binary_cross_entropy_with_logits(logit, target)
    assert loss_td["loss_continue"].item() == pytest.approx(naive.item(), rel=1e-5)


def _imagined(agent, critic_loss, n=6, horizon=H):
    torch.manual_seed(3)
    rssm = agent.world_model.rssm
    h = torch.randn(n, rssm.deter)
    z = F.one_hot(torch.randint(0, rssm.classes, (n, rssm.stoch)), rssm.classes).float()
    traj = imagine(agent.world_model, agent.actor, h, z, torch.ones(n), horizon)
    return TensorDict(traj, [n, horizon + 1])


def test_imagination_layout_and_no_grad():
    agent = _agent()
    traj = _imagined(agent, None)
    assert traj["feat"].shape == (6, H + 1, agent.world_model.feat_dim)
    assert traj["action"].shape == (6, H + 1, 3) and (traj["action"][:, -1] == 0).all()
    assert (traj["reward"][:, 0] == 0).all() and (traj["cont"][:, 0] == 1).all()
    assert not traj["feat"].requires_grad
    # module form: starts from [B, T] states, optional subset
    module = ImaginationModule(agent.world_model, agent.actor, H, start_fraction=0.5)
    states = TensorDict({"deter": torch.randn(B, T, 32), "stoch": traj["stoch"][:1, 0].expand(B * T, 4, 4).reshape(B, T, 4, 4),
                         "is_terminal": torch.zeros(B, T, dtype=torch.bool)}, [B, T])
    out = module(states)
    assert out.batch_size == (round(B * T * 0.5), H + 1)
    # stop_when_done is a data-dependent exit: no whole-loop compile (clear error, nothing compiled)
    with pytest.raises(ValueError, match="stop_when_done needs an eager imagination loop"):
        ImaginationModule(agent.world_model, agent.actor, H, stop_when_done=True).enable_compile("loop")


def test_critic_loss_targets_match_naive_lambda_returns():
    agent = _agent()
    _, critic, actor = _losses(agent)
    traj = _imagined(agent, critic)
    traj["cont"][2] = 1.0
    traj["cont"][2, 2] = 0.0  # a terminal state mid-trajectory
    before = _snapshot(traj)
    loss_td, targets = critic(traj)
    assert all(torch.equal(traj[k], v) for k, v in before.items())  # no mutation
    value = agent.critic.mean(agent.critic(traj["feat"])).detach()
    naive = lambda_returns(traj["reward"][:, 1:], traj["cont"][:, 1:], value, discount=0.99, lmbda=0.9)
    assert torch.allclose(targets["lambda_return"][:, :-1], naive, atol=1e-6)
    w = targets["weight"]
    assert w[2, 2] == 0 and w[2, 3] == 0 and w[2, 1] == pytest.approx(0.99)  # nothing past a terminal counts
    assert torch.allclose(w, imagination_weight(traj["cont"], 0.99))
    # gradient only into the online critic
    loss_td["loss_critic"].backward()
    assert agent.critic.net.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.slow_critic.parameters())
    assert all(p.grad is None for p in agent.world_model.parameters())


def test_lambda_returns_equal_torchrl_td_lambda():
    from torchrl.objectives.value.functional import td_lambda_return_estimate

    g = torch.Generator().manual_seed(0)
    n, h = 4, 9
    reward = torch.randn(n, h, generator=g, dtype=torch.float64)
    cont = torch.ones(n, h, dtype=torch.float64)
    cont[0, 4] = 0
    value = torch.randn(n, h + 1, generator=g, dtype=torch.float64)
    ours = lambda_returns(reward, cont, value, discount=0.97, lmbda=0.8)
    # TorchRL convention: reward/next_value/terminated at each transition, last step truncated
    done = (cont == 0).clone()
    done[:, -1] = True
    theirs = td_lambda_return_estimate(0.97, 0.8, value[:, 1:].unsqueeze(-1), reward.unsqueeze(-1),
                                       done.unsqueeze(-1), terminated=(cont == 0).unsqueeze(-1), time_dim=-2)
    assert torch.allclose(ours, theirs.squeeze(-1), atol=1e-10)


def test_actor_loss_reinforce_uses_normalised_stopgrad_advantage():
    agent = _agent()
    _, critic, actor = _losses(agent)
    traj = _imagined(agent, critic)
    _, targets = critic(traj)
    full = traj.clone().update(targets)
    before = _snapshot(full)
    out = actor(full)
    assert all(torch.equal(full[k], v) for k, v in before.items())
    # naive recomputation
    dist = agent.actor(full["feat"][:, :-1])
    logp = dist.log_prob(full["action"][:, :-1])
    ret, val = full["lambda_return"][:, :-1], full["value"][:, :-1]
    scale = out["return_scale"]
    adv = (ret - val) / scale
    naive = -((logp * adv + 3e-4 * dist.entropy()) * full["weight"][:, :-1]).mean()
    assert out["loss_actor"].item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-7)
    out["loss_actor"].backward()
    assert agent.actor.net.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in agent.critic.parameters())  # stop-gradient advantage
    assert all(p.grad is None for p in agent.world_model.parameters())  # actor input is detached


def test_group_baseline_advantage_is_the_return_minus_the_other_members_mean():
    agent = _agent()
    _, critic, _ = _losses(agent)
    actor = DreamerPolicyLoss(agent.actor, group_size=3)
    actor.make_value_estimator(gamma=0.99, lmbda=0.9)
    traj = _imagined(agent, critic)  # 6 trajectories: two groups of 3
    _, targets = critic(traj)
    full = traj.clone().update(targets)
    # returns of a visible size (an untrained model imagines ~0), so the advantage term dominates the loss
    full["lambda_return"] = torch.randn(6, H + 1, generator=torch.Generator().manual_seed(4)) * 5
    out = actor(full)
    dist = agent.actor(full["feat"][:, :-1])
    logp = dist.log_prob(full["action"][:, :-1])
    r0 = full["lambda_return"][:, 0].tolist()
    naive_adv = torch.empty(6)
    for i in range(6):
        group = range(3 * (i // 3), 3 * (i // 3) + 3)
        naive_adv[i] = r0[i] - sum(r0[j] for j in group if j != i) / 2
    adv = (naive_adv / out["return_scale"]).unsqueeze(1)  # the same advantage on every step
    naive = -((logp * adv + 3e-4 * dist.entropy()) * full["weight"][:, :-1]).mean()
    assert out["loss_actor"].item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-7)
    assert out["advantage_mean"].abs().item() < 1e-5  # leave-one-out: each group's advantages sum to 0
    # the critic-baseline loss of the same trajectories differs
    plain = DreamerPolicyLoss(agent.actor)
    plain.make_value_estimator(gamma=0.99, lmbda=0.9)
    plain_std = plain(full)["advantage_std"].item()
    assert out["advantage_std"].item() == pytest.approx(adv.expand(6, H).std().item(), rel=1e-4)
    assert plain_std != pytest.approx(out["advantage_std"].item(), rel=1e-2)
    with pytest.raises(ValueError, match="groups of 4"):
        bad = DreamerPolicyLoss(agent.actor, group_size=4)
        bad.make_value_estimator(gamma=0.99, lmbda=0.9)
        bad(full)
    with pytest.raises(ValueError, match="group_size"):
        DreamerPolicyLoss(agent.actor, group_size=0)


def test_imagination_groups_repeat_each_start_in_consecutive_rows():
    agent = _agent()
    torch.manual_seed(1)
    states = TensorDict({"deter": torch.randn(B, T, 32),
                         "stoch": F.one_hot(torch.randint(0, 4, (B, T, 4)), 4).float(),
                         "is_terminal": torch.zeros(B, T, dtype=torch.bool)}, [B, T])
    module = ImaginationModule(agent.world_model, agent.actor, H, start_fraction=0.5, group_size=3)
    out = module(states)
    n = round(B * T * 0.5) // 3 * 3  # 10 starts -> 3 groups of 3
    assert out.batch_size == (n, H + 1)
    first = out["deter"][:, 0].reshape(-1, 3, 32)
    assert torch.equal(first, first[:, :1].expand_as(first))  # one start per group
    assert len({tuple(g[0].tolist()) for g in first}) == n // 3  # distinct starts across groups
    later = out["deter"][:, -1].reshape(-1, 3, 32)
    assert not torch.equal(later, later[:, :1].expand_as(later))  # members imagine their own futures
    # all states (start_fraction 1) in groups: the same number of trajectories
    assert ImaginationModule(agent.world_model, agent.actor, H, group_size=2)(states).batch_size[0] == B * T // 2 * 2
    with pytest.raises(ValueError, match="group_size"):
        ImaginationModule(agent.world_model, agent.actor, H, group_size=1.5)


def test_actor_loss_dynamics_backprop_for_continuous_actions():
    agent = _agent(discrete=False, action_dim=2)
    critic = DreamerCriticLoss(agent.critic)
    actor = DreamerPolicyLoss(agent.actor, actor_grad="dynamics", critic=agent.critic)
    for loss in (critic, actor):
        loss.make_value_estimator(gamma=0.99, lmbda=0.9)
    rssm = agent.world_model.rssm
    torch.manual_seed(0)
    h = torch.randn(5, rssm.deter)
    z = F.one_hot(torch.randint(0, rssm.classes, (5, rssm.stoch)), rssm.classes).float()
    traj = TensorDict(imagine(agent.world_model, agent.actor, h, z, torch.ones(5), H, grad=True), [5, H + 1])
    _, targets = critic(traj)
    out = actor(traj.update(targets))
    grads = torch.autograd.grad(out["loss_actor"], list(agent.actor.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="continuous"):
        DreamerPolicyLoss(_agent().actor, actor_grad="dynamics", critic=agent.critic)


def test_loss_state_dict_round_trip():
    agent = _agent()
    _, critic, actor = _losses(agent)
    traj = _imagined(agent, critic)
    _, targets = critic(traj)
    actor(traj.clone().update(targets))  # moves the return normaliser
    critic.update_slow_critic()
    agent2 = copy.deepcopy(agent)
    critic2, actor2 = DreamerCriticLoss(agent2.critic), DreamerPolicyLoss(agent2.actor)
    critic2.load_state_dict(critic.state_dict())
    actor2.load_state_dict(actor.state_dict())
    assert torch.equal(actor2.return_normalizer.high, actor.return_normalizer.high)
    for p, q in zip(critic2.slow_critic.parameters(), critic.slow_critic.parameters()):
        assert torch.equal(p, q)


def test_slow_critic_is_an_ema():
    agent = _agent()
    critic = DreamerCriticLoss(agent.critic, slow_fraction=0.25)
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    old = [p.clone() for p in critic.slow_critic.parameters()]
    critic.update_slow_critic()
    for s, o, f in zip(critic.slow_critic.parameters(), old, agent.critic.parameters()):
        assert torch.allclose(s, 0.75 * o + 0.25 * f)


def test_masked_actor_never_samples_masked_action_and_log_probs_are_finite():
    torch.manual_seed(0)
    actor = DiscreteActor(8, 6, 16, 1)
    with torch.no_grad():
        actor.net.head.weight.mul_(1000)  # near-deterministic policy
    feat = torch.randn(10_000, 8)
    mask = torch.rand(10_000, 6) > 0.5
    mask[:, 0] = True
    dist = actor(feat, action_mask=mask)
    a = dist.sample()
    assert mask[a.bool()].all()
    assert (dist.probs[~mask] == 0).all()
    assert torch.isfinite(dist.log_prob(a)).all()
    ent = dist.entropy()
    ent.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in actor.parameters())


def test_update_guard_stops_before_optimizer_step():
    agent = _agent()
    wm, critic, actor = _losses(agent)
    opt = make_optimizer(agent, warmup_steps=0)
    update = DreamerUpdate(agent, wm, critic, actor, ImaginationModule(agent.world_model, agent.actor, H), opt)
    batch = _batch()
    update(batch)  # a good step
    params = [p.detach().clone() for p in agent.parameters()]
    moments = copy.deepcopy(opt.state_dict())
    bad = batch.clone()
    bad["reward"][0, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="loss/reward"):
        update(bad, iteration=7, run_dir="runs/x")
    assert all(torch.equal(p, q) for p, q in zip(agent.parameters(), params))
    assert str(opt.state_dict()["state"]) == str(moments["state"])


@pytest.mark.parametrize("start_fraction,group", [(1.0, 1), (0.5, 1), (1.0, 3)])
def test_fused_compiled_actor_critic_update_equals_the_separate_losses(start_fraction, group):
    """DreamerUpdate.enable_compile: critic, return normalisation, REINFORCE actor and replay-value
    terms as one compiled graph give the separate losses' values, diagnostics, return-scale EMA
    and gradients (imagination from all starts bootstraps the replay loss from imagined returns,
    from a subset or in groups from the critic)."""
    results = []
    for fused in (False, True):
        agent = _agent()
        wm, _, actor = _losses(agent)
        actor = DreamerPolicyLoss(agent.actor, group_size=group)
        actor.make_value_estimator(gamma=0.99, lmbda=0.9)
        critic = DreamerCriticLoss(agent.critic, replay_scale=0.3)
        critic.make_value_estimator(gamma=0.99, lmbda=0.9)
        imagination = ImaginationModule(agent.world_model, agent.actor, H, start_fraction=start_fraction,
                                        group_size=group)
        update = DreamerUpdate(agent, wm, critic, actor, imagination, make_optimizer(agent, warmup_steps=0))
        if fused:
            update.enable_compile()
        torch.manual_seed(4)
        metrics = update(_batch())
        assert update._fusable() == fused
        # imagined returns bootstrap the replay loss only when each replayed state was imagined once, in order
        assert (update._replay_bootstrap(torch.zeros(B * T), (B, T)) is None) == (start_fraction < 1 or group > 1)
        # the gradients of the update's last backward (actor + critic + replay value; the world
        # model's came first): LaProp normalises them, so parameters would hide an error
        results.append((metrics, [p.grad.clone() for p in agent.parameters()],
                        actor.return_normalizer.low.clone(), actor.return_normalizer.high.clone()))
    (m0, g0, lo0, hi0), (m1, g1, lo1, hi1) = results
    keys = [k for k in m0 if not k.startswith("time/")]
    assert keys == [k for k in m1 if not k.startswith("time/")]
    assert "loss/replay_value" in keys and "diag/return_scale" in keys and "diag/actor_entropy" in keys
    for k in keys:
        torch.testing.assert_close(m1[k], m0[k], atol=1e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(lo1, lo0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hi1, hi0, atol=1e-6, rtol=1e-5)
    assert float(hi0) != 0.0  # the EMA moved
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_actor_critic_is_not_used_where_the_actor_needs_per_step_inputs():
    agent = _agent()
    wm, critic, _ = _losses(agent)
    actor = DreamerPolicyLoss(agent.actor, actor_input_keys=("action_mask",))
    update = DreamerUpdate(agent, wm, critic, actor, ImaginationModule(agent.world_model, agent.actor, H),
                           make_optimizer(agent, warmup_steps=0))
    update.enable_compile()
    assert not update._fusable()


def test_optimizer_is_laprop_with_agc():
    """TorchRL's DreamerV3Optimizer against a direct transcription of the reference chain:
    AGC (0.3 of max(||p||, 1e-3) per tensor) -> RMS scaling (0.999, eps 1e-20, debiased) ->
    momentum 0.9 on the normalised gradient (debiased) -> -lr."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4))
    q = p.detach().clone()
    from torchrl.trainers.algorithms.dreamer_v3 import DreamerV3Optimizer

    opt = DreamerV3Optimizer([p], lr=0.01, warmup_steps=0)
    nu = torch.zeros_like(q)
    mu = torch.zeros_like(q)
    for step in range(1, 6):
        g = torch.randn(5, 4) * (10.0 if step % 2 else 0.01)
        p.grad = g.clone()
        opt.step()
        limit = 0.3 * q.norm().clamp_min(1e-3)
        g = g * (limit / torch.maximum(g.norm(), limit))
        nu = 0.999 * nu + 0.001 * g * g
        u = g / ((nu / (1 - 0.999**step)).sqrt() + 1e-20)
        mu = 0.9 * mu + 0.1 * u
        q = q - 0.01 * mu / (1 - 0.9**step)
        assert torch.allclose(p.detach(), q, atol=1e-5)


def test_terminal_weight_reweights_only_terminal_rows():
    agent = _agent()
    batch = _batch()
    torch.manual_seed(5)
    plain, states = DreamerWorldModelLoss(agent.world_model)(batch)
    torch.manual_seed(5)
    weighted, _ = DreamerWorldModelLoss(agent.world_model, terminal_weight=10.0)(batch)
    logit = agent.world_model.continue_head(states["feat"])
    per_row = F.binary_cross_entropy_with_logits(logit, 1.0 - batch["is_terminal"].float(), reduction="none")
    w = torch.where(batch["is_terminal"], 10.0, 1.0)
    assert weighted["loss_continue"].item() == pytest.approx((per_row * w).mean().item(), rel=1e-5)
    assert plain["loss_continue"].item() == pytest.approx(per_row.mean().item(), rel=1e-5)


def test_terminal_reward_weight_reweights_only_terminal_rows_of_the_reward_loss():
    agent = _agent()
    batch = _batch()
    torch.manual_seed(5)
    plain, states = DreamerWorldModelLoss(agent.world_model)(batch)
    torch.manual_seed(5)
    weighted, _ = DreamerWorldModelLoss(agent.world_model, terminal_reward_weight=7.0)(batch)
    head = agent.world_model.reward_head
    per_row = head.loss(head(states["feat"]), batch["reward"].reshape(states.batch_size).float())
    w = torch.where(batch["is_terminal"].reshape(states.batch_size), 7.0, 1.0)
    assert batch["is_terminal"].any() and not batch["is_terminal"].all()
    assert weighted["loss_reward"].item() == pytest.approx((per_row * w).mean().item(), rel=1e-5)
    assert plain["loss_reward"].item() == pytest.approx(per_row.mean().item(), rel=1e-5)
    assert weighted["loss_continue"].item() == pytest.approx(plain["loss_continue"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="terminal_reward_weight must be > 0"):
        DreamerWorldModelLoss(agent.world_model, terminal_reward_weight=0.0)


def test_imagined_continue_is_probability_or_mode():
    agent = _agent()
    rssm = agent.world_model.rssm
    torch.manual_seed(0)
    h = torch.randn(6, rssm.deter)
    z = F.one_hot(torch.randint(0, rssm.classes, (6, rssm.stoch)), rssm.classes).float()
    torch.manual_seed(1)
    soft = imagine(agent.world_model, agent.actor, h, z, torch.ones(6), H, cont_mode="prob")
    torch.manual_seed(1)
    hard = imagine(agent.world_model, agent.actor, h, z, torch.ones(6), H, cont_mode="mode")
    logit = agent.world_model.continue_head(soft["feat"][:, 1:])
    assert torch.allclose(soft["cont"][:, 1:], torch.sigmoid(logit), atol=1e-6)
    assert torch.equal(hard["cont"][:, 1:], (logit > 0).float())
    with pytest.raises(ValueError, match="cont_mode"):
        imagine(agent.world_model, agent.actor, h, z, torch.ones(6), H, cont_mode="soft")


def test_replay_value_targets_respect_episode_boundaries():
    agent = _agent()
    critic = DreamerCriticLoss(agent.critic, replay_scale=1.0)
    critic.make_value_estimator(gamma=0.9, lmbda=0.5)
    T = 6
    feat = torch.randn(1, T, agent.world_model.feat_dim)
    reward = torch.tensor([[0.0, 1.0, 2.0, 0.0, 4.0, 5.0]])
    is_first = torch.tensor([[True, False, False, True, False, False]])  # episode 2 starts at row 3
    is_terminal = torch.zeros(1, T, dtype=torch.bool)  # row 2 is a truncation (last row, not terminal)
    states = TensorDict({"feat": feat, "reward": reward, "is_first": is_first, "is_terminal": is_terminal}, [1, T])
    boot = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]])
    critic.replay_loss(states, boot)  # runs
    # naive targets: R_2 = boot_2 (never crosses into episode 2); R_1 = r_2 + g((1-l) V_2 + l R_2)
    g, lam = 0.9, 0.5
    r2 = 30.0
    r1 = 2.0 + g * ((1 - lam) * 30.0 + lam * r2)
    r0 = 1.0 + g * ((1 - lam) * 20.0 + lam * r1)
    r4 = 5.0 + g * ((1 - lam) * 60.0 + lam * 60.0)
    r3 = 4.0 + g * ((1 - lam) * 50.0 + lam * r4)
    logits = agent.critic(feat[:, :-1])
    expected = torch.stack([agent.critic.loss(logits[0, i], torch.tensor(v)) for i, v in enumerate([r0, r1, r2, r3, r4])]).mean()
    assert critic.replay_loss(states, boot).item() == pytest.approx(expected.item(), rel=1e-5)


def test_continuous_samples_are_unclipped_so_the_std_gradient_is_unbiased():
    """Regression (Pendulum stuck at max std): with a constant advantage, REINFORCE on
    the log-prob of *clipped* samples pushes log-std up; on raw samples its expectation is 0."""
    from torchrl_dreamer.dreamer.nets import BoundedNormalDist, clip_action

    torch.manual_seed(0)
    log_std = torch.zeros(1, requires_grad=True)
    dist = BoundedNormalDist(torch.full((200_000, 1), 0.8), log_std.exp().expand(200_000, 1))
    a = dist.sample()
    assert (a.abs() > 1).any()  # raw samples, not clipped
    (-(dist.log_prob(a.detach()) * -1.0).mean()).backward()  # constant advantage -1
    assert abs(log_std.grad.item()) < 0.02
    biased = torch.zeros(1, requires_grad=True)
    d2 = BoundedNormalDist(torch.full((200_000, 1), 0.8), biased.exp().expand(200_000, 1))
    (-(d2.log_prob(a.detach().clamp(-1, 1)) * -1.0).mean()).backward()
    assert biased.grad.item() < -0.2  # the old clipped log-prob: descent raises the std
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    y = clip_action(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, 0.5, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))  # straight-through


def test_compiled_imagination_loop_equals_eager():
    """ImaginationModule.enable_compile(mode="loop"): the whole rollout as one graph, its randomness
    drawn before the loop (draw_noise), gives the eager trajectory for the same noise."""
    agent = _agent()
    states = TensorDict({"deter": torch.randn(B, T, 32),
                         "stoch": F.one_hot(torch.randint(0, 4, (B, T, 4)), 4).float(),
                         "is_terminal": torch.zeros(B, T, dtype=torch.bool)}, [B, T])
    eager = ImaginationModule(agent.world_model, agent.actor, H)
    compiled = ImaginationModule(agent.world_model, agent.actor, H)
    compiled.enable_compile(mode="loop")
    eager.predraw_noise = True
    torch.manual_seed(5)
    a = eager(states)
    torch.manual_seed(5)
    b = compiled(states)
    for key in ("deter", "stoch", "action", "log_prob", "reward", "cont"):
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="compile mode"):
        eager.enable_compile(mode="graph")


def test_sampling_from_predrawn_noise_has_the_policy_distribution_and_respects_the_mask():
    """Gumbel-max with pre-drawn noise (compiled imagination) samples the unimixed policy; a masked
    action is never drawn. Normal actors: mean + std * eps."""
    from torchrl_dreamer.dreamer.imagination import draw_noise
    from torchrl_dreamer.dreamer.rssm import gumbel_noise

    probs = torch.tensor([[0.7, 0.0, 0.2, 0.1]]).expand(200_000, 4)
    a = OneHotDist(probs).sample_from_noise(gumbel_noise((200_000, 4)))
    freq = a.mean(0)
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs[0], atol=5e-3, rtol=0)
    agent = _agent()
    act_noise, z_gumbel, z_mix = draw_noise(agent.actor, agent.world_model.rssm, 5, H)
    assert act_noise.shape == (H, 5, 3) and z_gumbel.shape == (H, 5, 4, 4) and z_mix.shape == (H, 5, 4)
    assert ((z_mix >= 0) & (z_mix < 1)).all()
    from torchrl_dreamer.dreamer.nets import BoundedNormalDist
    d = BoundedNormalDist(torch.zeros(2, 1), torch.full((2, 1), 0.5))
    assert torch.equal(d.sample_from_noise(torch.ones(2, 1)), torch.full((2, 1), 0.5))


@pytest.mark.parametrize("twohot", ["symlog", "symexp"])
def test_compiled_critic_and_actor_losses_equal_eager_values_and_gradients(twohot):
    """DreamerWorldModelLoss/DreamerCriticLoss/DreamerPolicyLoss.enable_compile: the compiled tensor cores (forward and
    backward, incl. the replay-value loss) give eager's losses, targets and parameter gradients, with either
    two-hot spacing of the reward head and the critic."""
    torch.manual_seed(3)
    N = 6
    traj = TensorDict({"feat": torch.randn(N, H + 1, 32 + 16), "reward": torch.randn(N, H + 1),
                       "cont": torch.rand(N, H + 1),
                       "action": F.one_hot(torch.randint(0, 3, (N, H + 1)), 3).float()}, [N, H + 1])
    states = TensorDict({"feat": torch.randn(B, T, 48), "reward": torch.randn(B, T),
                         "is_terminal": torch.zeros(B, T, dtype=torch.bool),
                         "is_first": torch.zeros(B, T, dtype=torch.bool)}, [B, T])
    states["is_first"][1, 4] = True
    results = []
    for compiled in (False, True):
        agent = _agent(twohot=twohot)
        assert agent.critic.codec.space == agent.world_model.reward_head.codec.space == twohot
        critic, actor = DreamerCriticLoss(agent.critic, replay_scale=0.3), DreamerPolicyLoss(agent.actor)
        wm = DreamerWorldModelLoss(agent.world_model, terminal_weight=5.0)
        if compiled:
            critic.enable_compile()
            actor.enable_compile()
            wm.enable_compile()
        torch.manual_seed(11)  # same posterior samples
        wm_td, _ = wm(_batch())
        sum(v for k, v in wm_td.items() if k.startswith("loss_")).backward()
        critic_td, targets = critic(traj)
        actor_td = actor(traj.clone().update(targets))
        replay = critic.replay_loss(states)
        (critic_td["loss_critic"] + actor_td["loss_actor"] + replay).backward()
        grads = [p.grad.clone() for p in agent.parameters() if p.grad is not None]
        results.append((critic_td, targets, actor_td, replay, grads, wm_td))
    (c0, t0, a0, r0, g0, w0), (c1, t1, a1, r1, g1, w1) = results
    assert len(g0) == len(g1) == len(list(agent.parameters()))
    for key in w0.keys():
        torch.testing.assert_close(w1[key], w0[key], atol=1e-5, rtol=1e-4)
    for key in c0.keys():
        torch.testing.assert_close(c1[key], c0[key], atol=1e-5, rtol=1e-4)
    for key in ("value", "lambda_return", "weight"):
        torch.testing.assert_close(t1[key], t0[key], atol=1e-5, rtol=1e-4)
    for key in a0.keys():
        torch.testing.assert_close(a1[key], a0[key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r1, r0, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_optimizer_equals_torchrl_dreamer_v3_optimizer():
    """make_optimizer(compile=True): the compiled LaProp + AGC update gives TorchRL's
    DreamerV3Optimizer's parameters and moments over several steps (warm-up included, per-group
    learning rates), and its state_dict loads into TorchRL's optimizer."""
    from torchrl_dreamer.dreamer.update import CompiledDreamerV3Optimizer

    agents = [_agent(), _agent()]
    opts = [make_optimizer(a, world_model_lr=1e-3, actor_lr=3e-4, critic_lr=2e-3, warmup_steps=2, compile=c)
            for a, c in zip(agents, (False, True))]
    assert isinstance(opts[1], CompiledDreamerV3Optimizer)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g) * (10.0 if step == 1 else 1.0) for p in agents[0].parameters()]
        for agent, opt in zip(agents, opts):
            for p, gr in zip(agent.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    for p, q in zip(*(a.parameters() for a in agents)):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    s0, s1 = opts[0].state_dict(), opts[1].state_dict()
    assert [grp["step"] for grp in s0["param_groups"]] == [grp["step"] for grp in s1["param_groups"]] == [4, 4, 4]
    for k in s0["state"]:
        for name in ("rms", "momentum"):
            torch.testing.assert_close(s1["state"][k][name], s0["state"][k][name], atol=1e-6, rtol=1e-5)
    opts[0].load_state_dict(s1)


def test_actor_distribution_slice_equals_the_actor_on_the_slice():
    """DreamerPolicyLoss runs the actor on all H+1 states and slices the distribution (``dist[:, :-1]``);
    log-probs, entropies and gradients equal running it on the first H states."""
    from torchrl_dreamer.dreamer.nets import ContinuousActor, DiscreteActor
    torch.manual_seed(0)
    feat = torch.randn(5, H + 1, 12)
    for actor, action in ((DiscreteActor(12, 3, 16, 2), F.one_hot(torch.randint(0, 3, (5, H)), 3).float()),
                          (ContinuousActor(12, 2, 16, 2), torch.randn(5, H, 2))):
        grads = []
        for dist in (actor(feat)[:, :-1], actor(feat[:, :-1])):
            actor.zero_grad()
            out = torch.stack([dist.log_prob(action), dist.entropy()])
            out.sum().backward()
            grads.append((out.detach(), [p.grad.clone() for p in actor.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0])
        for a, b in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_actor_loss_with_a_distribution_that_cannot_be_sliced():
    """A custom actor whose distribution has no ``__getitem__`` still gets the loss on the first H
    states (recomputed on the slice)."""
    agent = _agent()
    _, critic, actor_loss = _losses(agent)
    traj = _imagined(agent, critic)
    _, targets = critic(traj)
    full = traj.clone().update(targets)
    reference = actor_loss(full)["loss_actor"]

    class Plain:  # the OneHotDist interface without __getitem__
        def __init__(self, dist):
            self.dist = dist

        def log_prob(self, action):
            return self.dist.log_prob(action)

        def entropy(self):
            return self.dist.entropy()

    class Wrapped(torch.nn.Module):
        discrete = True

        def __init__(self, actor):
            super().__init__()
            self.inner = actor

        def forward(self, feat, **kw):
            return Plain(self.inner(feat, **kw))

    wrapped = DreamerPolicyLoss(Wrapped(agent.actor))
    wrapped.make_value_estimator(gamma=0.997, lmbda=0.95)
    wrapped.return_normalizer.load_state_dict(actor_loss.return_normalizer.state_dict())
    wrapped.eval(), actor_loss.eval()
    torch.testing.assert_close(wrapped(full)["loss_actor"], actor_loss(full)["loss_actor"])
    assert torch.isfinite(reference)


def test_continue_probability_on_terminal_rows_is_reported_and_divided_per_window():
    """diag terminal_rows / continue_prob_terminal_sum: the continue head's probability on the
    replayed terminal rows (the calibration imagination relies on), summed over the one terminal row
    of the batch; terminal_calibration divides window means and gives NaN without terminal rows."""
    import math

    from torchrl_dreamer.dreamer.update import terminal_calibration

    agent = _agent()
    wm, _, _ = _losses(agent)
    batch = _batch()
    loss_td, states = wm(batch)
    assert loss_td["terminal_rows"].item() == 1.0
    p = loss_td["continue_prob_terminal_sum"].item()
    with torch.no_grad():  # the head on the posterior features of the terminal row (batch 1, step 3)
        expected = torch.sigmoid(agent.world_model.continue_head(states["feat"][1, 3])).item()
    assert 0.0 < p < 1.0 and p == pytest.approx(expected, rel=1e-4)
    row = terminal_calibration({"diag/terminal_rows": 0.5, "diag/continue_prob_terminal_sum": 0.1, "x": 1.0})
    assert row == {"x": 1.0, "diag/continue_prob_at_terminal": pytest.approx(0.2),
                   "diag/terminal_rows_per_update": 0.5}
    empty = terminal_calibration({"diag/terminal_rows": 0.0, "diag/continue_prob_terminal_sum": 0.0})
    assert math.isnan(empty["diag/continue_prob_at_terminal"])


def test_per_trajectory_constants_give_the_same_values_and_gradients_as_indexing():
    """The actor loss reads per-trajectory constants (stored by imagination as stride-0 broadcasts
    along the trajectory) with a cheap backward: same values and gradients as ``x[:, 0]``."""
    torch.manual_seed(0)
    base = torch.randn(5, 3, 4, requires_grad=True)
    weight = torch.randn(3, 4)
    grads = []
    for fn in (per_trajectory, lambda x: x[:, 0]):
        stored = (base * 2).unsqueeze(1).expand(5, 7, 3, 4)
        assert stored.stride(1) == 0
        first = fn(stored)
        assert torch.equal(first, (base * 2).detach())
        ((first * weight).sin().sum()).backward()
        grads.append(base.grad.clone())
        base.grad = None
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    materialised = torch.randn(5, 7, 3, requires_grad=True)  # not a broadcast: plain indexing, exact
    per_trajectory(materialised).sum().backward()
    assert torch.equal(materialised.grad[:, 0], torch.ones(5, 3)) and not materialised.grad[:, 1:].any()


def test_twohot_option_reaches_the_reward_head_and_the_critic():
    """``model.twohot`` (recipe config) -> ``ModelSizes.twohot`` -> both two-hot heads; symlog by default; an
    agent saved with one spacing does not load into the other (named error, not silently swapped bins)."""
    from recipes.dreamer import ModelConfig, model_sizes
    from torchrl_dreamer.checkpoint import CheckpointError, load_weights
    from torchrl_dreamer.dreamer.config import TwoHotSpace

    assert ModelConfig().twohot == "symlog"
    agents = {}
    for space in TwoHotSpace:
        agents[space.value] = make_agent({"observation": (5,)}, 3, True,
                                         model_sizes(ModelConfig(size="nano", twohot=space)))
        codecs = (agents[space.value].world_model.reward_head.codec, agents[space.value].critic.codec)
        assert [c.space for c in codecs] == [space.value] * 2
    agents["symexp"].load_state_dict(copy.deepcopy(agents["symexp"].state_dict()))
    # through the recipes' loader (resume, evaluation): the CheckpointError a user sees names the option
    with pytest.raises(CheckpointError, match="model.twohot"):
        load_weights(agents["symexp"], agents["symlog"].state_dict(), "checkpoint")
