"""The loss contract (tests/contract.py) for the baselines' losses (MultiAgentPPOLoss, PointerPPOLoss),
and the check that the packages outside torchrl_dreamer (baselines, recipes, envs) hold no
LossModule without one."""
from functools import partial
from unittest import mock

import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from baselines.mappo import MultiAgentPPOLoss, TanhNormalPolicy
from baselines.pointer_ppo import PointerPPOLoss, compute_advantage, rollout
from envs.routing import TSPEnv
from torchrl_dreamer.pointer import PointerActorCritic
from baselines.mappo_networks import AgentGroupMLP, TanhNormalHead

from contract import LossContract, loss_modules_in

N, A, D, ACT = 64, 3, 5, 2


def _policy_and_critic(seed):
    torch.manual_seed(seed)
    backbone = AgentGroupMLP(D, 2 * ACT, A, centralised=False, share_params=True, width=16, depth=2)
    policy = TanhNormalPolicy(backbone, TanhNormalHead(-torch.ones(ACT) * 2, torch.ones(ACT) * 3))
    critic = AgentGroupMLP(D, 1, A, centralised=True, share_params=True, width=16, depth=2)
    return policy, critic


class TestMultiAgentPPOLossContract(LossContract):
    """Reads observation, action_pretanh, sample_log_prob, advantage and value_target (value, reward,
    done and terminated are the value estimator's keys)."""

    loss_class = MultiAgentPPOLoss
    loss_terms = frozenset({"loss_objective", "loss_critic", "loss_entropy"})

    def make_loss(self, seed=0):
        loss = MultiAgentPPOLoss(*_policy_and_critic(seed), entropy_coef=0.01)
        loss.make_value_estimator(gamma=0.99, lmbda=0.95)
        return loss

    def make_input(self):
        g = torch.Generator().manual_seed(1)
        policy, _ = _policy_and_critic(seed=7)  # the behaviour policy: ratios away from 1
        obs = torch.randn(N, A, D, generator=g)
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            torch.manual_seed(2)
            action, u, log_prob = policy(obs)
        agents = TensorDict({"observation": obs, "action": action, "action_pretanh": u, "action_log_prob": log_prob,
                             "advantage": torch.randn(N, A, 1, generator=g),
                             "value_target": torch.randn(N, A, 1, generator=g)}, batch_size=[N, A])
        return TensorDict({"agents": agents}, batch_size=[N])

    def compile_loss(self, loss, backend):
        # enable_compile() takes no options: its torch.compile call gets the test backend
        with mock.patch.object(torch, "compile", partial(torch.compile, backend=backend)):
            loss.enable_compile()

    def test_compiled_losses_fn_equals_eager(self):
        """The compiled path ppo_update takes: enable_compile() builds a graph for losses_fn, with
        eager's values and gradients."""
        from torch._dynamo.testing import CompileCounterWithBackend

        td = self.make_input()
        keys = MultiAgentPPOLoss.default_keys()
        args = [td.get(getattr(keys, name)) for name in
                ("observation", "action_pretanh", "sample_log_prob", "advantage", "value_target")]
        results = []
        for compiled in (False, True):
            loss = self.make_loss()
            if compiled:
                counter = CompileCounterWithBackend("aot_eager")
                self.compile_loss(loss, counter)
            torch.manual_seed(0)
            terms = loss.losses_fn(*args)
            total = terms["loss_objective"] + terms["loss_critic"] + terms["loss_entropy"]
            grads = torch.autograd.grad(total, list(loss.parameters()), allow_unused=True)
            results.append(({k: v.detach() for k, v in terms.items()}, grads))
        assert counter.frame_count >= 1 and counter.op_count > 0
        (eager, g0), (comp, g1) = results
        assert comp.keys() == eager.keys()
        for k in eager:
            torch.testing.assert_close(comp[k], eager[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
        for a, b in zip(g0, g1):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


class TestPointerPPOLossContract(LossContract):
    """Routing PPO on a tiny TSP rollout batch (demand, remaining_capacity and forced are CVRP /
    multi-start keys; reward is read by the multi-start first-move term only)."""

    loss_class = PointerPPOLoss
    loss_terms = frozenset({"loss_objective", "loss_critic", "loss_entropy"})
    read_keys = ("locs", "current_node", "first_node", "action", "sample_log_prob", "active", "advantage",
                 "value_target")

    @staticmethod
    def _model(seed):
        torch.manual_seed(seed)
        return PointerActorCritic("tsp", embed_dim=16, n_layers=1, n_heads=2, ff_dim=16)

    def make_loss(self, seed=0):
        return PointerPPOLoss(self._model(seed), clip_epsilon=0.2, entropy_coef=0.01, critic_coef=0.5)

    def make_input(self):
        model = self._model(7)  # the behaviour policy: ratios away from 1
        torch.manual_seed(3)
        batch = rollout(TSPEnv(num_nodes=6, batch_size=8, seed=3), model)
        compute_advantage(batch, 1.0, 0.95)
        batch = batch.detach()
        batch["active"][::2, -2:] = False  # rows of different lengths (as padded CVRP episodes), so 'active' matters
        return batch


def test_no_loss_module_outside_torchrl_dreamer_lacks_a_contract():
    covered = {c.loss_class for c in globals().values() if isinstance(c, type) and issubclass(c, LossContract)
               and c is not LossContract}
    found = loss_modules_in("baselines", "recipes", "envs")
    assert found == {MultiAgentPPOLoss, PointerPPOLoss}
    assert found <= covered, f"LossModules without a contract test: {sorted(c.__name__ for c in found - covered)}"
