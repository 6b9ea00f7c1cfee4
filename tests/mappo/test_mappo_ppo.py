"""PPO pieces: networks, the tanh-Gaussian head, equality with TorchRL's ClipPPOLoss, guards (the loss
contract: test_mappo_loss_contract.py)."""
import copy

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreamer.guards import NonFiniteError
from baselines.mappo_networks import AgentGroupMLP, TanhNormalHead
from baselines.mappo import MultiAgentPPOLoss, TanhNormalPolicy, make_torchrl_clip_ppo_loss, ppo_update

N, A, D, ACT = 512, 3, 5, 2


def _policy_and_critic(seed=0, share=True, centralised=True):
    torch.manual_seed(seed)
    backbone = AgentGroupMLP(D, 2 * ACT, A, centralised=False, share_params=share, width=32, depth=2)
    policy = TanhNormalPolicy(backbone, TanhNormalHead(-torch.ones(ACT) * 2, torch.ones(ACT) * 3))
    critic = AgentGroupMLP(D, 1, A, centralised=centralised, share_params=share, width=32, depth=2)
    return policy, critic


def _batch(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(N, A, D, generator=g)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        action, u, log_prob = policy(obs)
    return TensorDict(
        {
            "agents": TensorDict(
                {
                    "observation": obs,
                    "action": action,
                    "action_pretanh": u,
                    "action_log_prob": log_prob,
                    "advantage": torch.randn(N, A, 1, generator=g),
                    "value_target": torch.randn(N, A, 1, generator=g),
                },
                batch_size=[N, A],
            )
        },
        batch_size=[N],
    )


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("centralised", [True, False])
def test_multiagent_mlp_shapes_and_dependencies(share, centralised):
    net = AgentGroupMLP(D, 4, A, centralised=centralised, share_params=share, width=16, depth=2)
    x = torch.randn(7, 2, A, D)
    out = net(x)
    assert out.shape == (7, 2, A, 4)
    x2 = x.clone()
    x2[..., 0, :] += 1.0  # change agent 0's input only
    changed = (net(x2) - out).abs().amax(dim=(0, 1, 3)) > 1e-6  # per agent
    assert changed[0]
    assert bool(changed[1:].all()) == centralised  # others see agent 0 only when centralised
    if share and centralised:
        assert torch.allclose(out[..., 0, :], out[..., 1, :])
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(3, A + 1, D))


def test_per_agent_parameters_are_independent():
    net = AgentGroupMLP(D, 2, A, centralised=False, share_params=False, width=8, depth=1)
    x = torch.randn(4, A, D)
    out = net(x)
    with torch.no_grad():
        net.net[0].weight[0].add_(1.0)  # agent 0's first layer only
    out2 = net(x)
    assert not torch.allclose(out[:, 0], out2[:, 0])
    assert torch.equal(out[:, 1:], out2[:, 1:])


def test_tanh_normal_head_log_prob_matches_torch_distributions():
    head = TanhNormalHead(torch.tensor([-2.0, 0.0]), torch.tensor([3.0, 1.0]))
    loc, scale = torch.randn(100, 2), torch.rand(100, 2) + 0.1
    u = loc + scale * torch.randn(100, 2)
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(loc, scale),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(head.low + head.half_range, head.half_range)],
    )
    action = head.squash(u)
    assert torch.allclose(head.log_prob(u, loc, scale), ref.log_prob(action).sum(-1), atol=1e-4)
    assert (action >= head.low).all() and (action <= head.low + 2 * head.half_range).all()


def test_policy_deterministic_mode_uses_loc():
    policy, _ = _policy_and_critic()
    obs = torch.randn(4, A, D)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        a1, u1, _ = policy(obs)
        a2, _, _ = policy(obs)
    loc, _ = policy.distribution_params(obs)
    assert torch.equal(a1, a2) and torch.equal(u1, loc)


@pytest.mark.parametrize("critic_loss", ["smooth_l1", "l2"])
def test_fused_loss_equals_torchrl_clip_ppo_loss(critic_loss):
    policy, critic = _policy_and_critic()
    batch = _batch(policy)
    with torch.no_grad():  # move the policy so ratios leave [0.8, 1.2] for some samples
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = MultiAgentPPOLoss(policy, critic, clip_epsilon=0.2, entropy_coef=0.01, critic_loss=critic_loss)
    ref = make_torchrl_clip_ppo_loss(policy, critic, clip_epsilon=0.2, entropy_coef=0.01, critic_loss=critic_loss)
    ours = fused(batch.clone())
    theirs = ref(batch.clone())
    assert ours["clip_fraction"] > 0.01
    assert ours["loss_objective"].item() == pytest.approx(theirs["loss_objective"].item(), abs=2e-5)
    assert ours["loss_critic"].item() == pytest.approx(theirs["loss_critic"].item(), rel=1e-5)
    assert ours["clip_fraction"].item() == pytest.approx(theirs["clip_fraction"].item(), abs=2e-3)
    # both estimate the entropy from one sample: equal in expectation only
    assert ours["entropy"].item() == pytest.approx(theirs["entropy"].mean().item(), rel=0.05)
    # gradients of the objective agree too
    g_ours = torch.autograd.grad(ours["loss_objective"], list(policy.parameters()))
    g_theirs = torch.autograd.grad(theirs["loss_objective"], list(policy.parameters()))
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_ppo_update_learns_the_critic_and_reports_metrics():
    policy, critic = _policy_and_critic()
    loss = MultiAgentPPOLoss(policy, critic)
    batch = _batch(policy)
    obs = batch["agents", "observation"]  # a learnable target: a smooth function of the observations
    batch["agents", "value_target"] = 0.5 * obs.sum(-1, keepdim=True).sum(-2, keepdim=True).expand(N, A, 1)
    opt = torch.optim.Adam(loss.parameters(), lr=1e-3)
    with torch.no_grad():
        std_before = float(policy.distribution_params(obs)[1].mean())
    first = ppo_update(loss, batch, opt, epochs=1, minibatch_size=128, max_grad_norm=1.0)
    assert first["diag/action_std"] == pytest.approx(std_before, rel=0.05)  # the Gaussian's std, pre-squash
    for _ in range(15):
        last = ppo_update(loss, batch, opt, epochs=1, minibatch_size=128, max_grad_norm=1.0)
    assert last["loss/critic"] < 0.5 * first["loss/critic"]
    assert first["diag/optimizer_steps"] == 4
    for key in ("loss/objective", "loss/entropy", "diag/entropy", "diag/clip_fraction", "diag/kl_approx", "diag/grad_norm"):
        assert key in first


def test_nan_guard_stops_before_the_optimizer_step():
    policy, critic = _policy_and_critic()
    loss = MultiAgentPPOLoss(policy, critic)
    batch = _batch(policy)
    batch["agents", "advantage"][3, 1] = float("nan")
    opt = torch.optim.Adam(loss.parameters(), lr=1e-3)
    params_before = copy.deepcopy(loss.state_dict())
    with pytest.raises(NonFiniteError) as err:
        ppo_update(loss, batch, opt, epochs=1, minibatch_size=N, max_grad_norm=1.0, iteration=7, run_dir="runs/x")
    msg = str(err.value)
    assert "loss/objective" in msg and "iteration 7" in msg and "runs/x" in msg
    for k, v in loss.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    assert len(opt.state) == 0  # Adam never stepped: its moments are not poisoned


def test_minibatch_larger_than_batch_is_an_error():
    policy, critic = _policy_and_critic()
    loss = MultiAgentPPOLoss(policy, critic)
    opt = torch.optim.Adam(loss.parameters())
    with pytest.raises(ValueError, match="larger than the batch"):
        ppo_update(loss, _batch(policy), opt, epochs=1, minibatch_size=N + 1, max_grad_norm=1.0)
