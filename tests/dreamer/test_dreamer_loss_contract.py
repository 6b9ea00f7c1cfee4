"""The loss contract (tests/contract.py) for the Dreamer losses: DreamerWorldModelLoss,
DreamerCriticLoss and DreamerPolicyLoss (REINFORCE and dynamics backpropagation)."""
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from torchrl_dreamer.dreamer.agent import make_agent, preset
from torchrl_dreamer.dreamer.losses import DreamerCriticLoss, DreamerPolicyLoss, DreamerWorldModelLoss

from contract import LossContract, loss_modules_in

SIZES = preset("tiny", deter=32, hidden=16, units=16, stoch=4, classes=4, blocks=2, bins=31)
B, T, N, H = 3, 5, 6, 4
OBS, ACT = 5, 3


def _agent(seed: int, discrete: bool = True, action_dim: int = ACT):
    """A tiny agent with every parameter moved off its initialisation (the reward and critic heads
    start at zero: their outputs would not depend on the inputs or the seed)."""
    torch.manual_seed(seed)
    agent = make_agent({"observation": (OBS,)}, action_dim, discrete, SIZES)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return agent


def _feat_dim():
    return SIZES.deter + SIZES.stoch * SIZES.classes


class TestDreamerWorldModelLossContract(LossContract):
    loss_class = DreamerWorldModelLoss
    loss_terms = frozenset({"loss_reconstruction", "loss_reward", "loss_continue", "loss_dyn", "loss_rep"})

    def make_loss(self, seed=0):
        return DreamerWorldModelLoss(_agent(seed).world_model, terminal_weight=5.0)

    def make_input(self):
        g = torch.Generator().manual_seed(0)
        is_first = torch.zeros(B, T, dtype=torch.bool)
        is_first[:, 0] = True
        is_first[1, 3] = True  # a new episode after the terminal row 2
        is_terminal = torch.zeros(B, T, dtype=torch.bool)
        is_terminal[1, 2] = True
        valid = torch.ones(B, T)
        valid[2, 4:] = 0.0  # a padded tail
        return TensorDict({
            "observation": torch.randn(B, T, OBS, generator=g),
            "action": F.one_hot(torch.randint(0, ACT, (B, T), generator=g), ACT).float(),
            "reward": torch.randn(B, T, generator=g), "is_first": is_first, "is_terminal": is_terminal,
            "valid": valid,
        }, [B, T])


class TestDreamerCriticLossContract(LossContract):
    loss_class = DreamerCriticLoss
    loss_terms = frozenset({"loss_critic"})

    def make_loss(self, seed=0):
        loss = DreamerCriticLoss(_agent(seed).critic)
        loss.make_value_estimator(gamma=0.99, lmbda=0.9)
        return loss

    def make_input(self):
        g = torch.Generator().manual_seed(1)
        return TensorDict({"feat": torch.randn(N, H + 1, _feat_dim(), generator=g),
                           "reward": torch.randn(N, H + 1, generator=g),
                           "cont": torch.rand(N, H + 1, generator=g)}, [N, H + 1])


def _trajectory(action):
    g = torch.Generator().manual_seed(2)
    return {"feat": torch.randn(N, H + 1, _feat_dim(), generator=g), "action": action,
            "weight": torch.rand(N, H + 1, generator=g) + 0.1}


class TestDreamerPolicyLossContract(LossContract):
    """REINFORCE (the default): reads feat, action, value, lambda_return and weight."""

    loss_class = DreamerPolicyLoss
    loss_terms = frozenset({"loss_actor"})

    def make_loss(self, seed=0):
        loss = DreamerPolicyLoss(_agent(seed).actor)
        loss.make_value_estimator(gamma=0.99, lmbda=0.9)
        return loss

    def make_input(self):
        g = torch.Generator().manual_seed(3)
        action = F.one_hot(torch.randint(0, ACT, (N, H + 1), generator=g), ACT).float()
        return TensorDict({**_trajectory(action), "value": torch.randn(N, H + 1, generator=g),
                           "lambda_return": torch.randn(N, H + 1, generator=g)}, [N, H + 1])


class TestDreamerPolicyLossDynamicsContract(LossContract):
    """actor_grad="dynamics" (continuous actions): reads feat, action, weight, reward and cont; the
    compiled path is REINFORCE's only."""

    loss_class = DreamerPolicyLoss
    loss_terms = frozenset({"loss_actor"})
    supports_compile = False

    def make_loss(self, seed=0):
        agent = _agent(seed, discrete=False, action_dim=2)
        loss = DreamerPolicyLoss(agent.actor, actor_grad="dynamics", critic=agent.critic)
        loss.make_value_estimator(gamma=0.99, lmbda=0.9)
        return loss

    def make_input(self):
        g = torch.Generator().manual_seed(4)
        return TensorDict({**_trajectory(torch.randn(N, H + 1, 2, generator=g).clamp(-1, 1)),
                           "reward": torch.randn(N, H + 1, generator=g), "cont": torch.rand(N, H + 1, generator=g)},
                          [N, H + 1])

    @pytest.mark.xfail(strict=True, reason=(
        "the critic that bootstraps the returns is held outside the module (owned by DreamerCriticLoss, "
        "not trained from here), so the policy loss's state_dict does not carry it: a loaded loss still "
        "uses its own critic"))
    def test_state_dict_round_trip(self):
        super().test_state_dict_round_trip()


def test_every_loss_module_of_torchrl_dreamer_has_a_contract():
    covered = {c.loss_class for c in globals().values() if isinstance(c, type) and issubclass(c, LossContract)
               and c is not LossContract}
    found = loss_modules_in("torchrl_dreamer")
    assert found == {DreamerWorldModelLoss, DreamerCriticLoss, DreamerPolicyLoss}
    assert found <= covered, f"LossModules without a contract test: {sorted(c.__name__ for c in found - covered)}"
