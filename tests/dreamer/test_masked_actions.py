"""Masked discrete actions in Dreamer on any env (envs/masked_grid.py raises on a masked action),
both discrete spec kinds, and the imagined masks (rule or learned head)."""
import pytest
import torch
import torch.nn.functional as F
from torchrl.envs.utils import ExplorationType, set_exploration_type

from envs.masked_grid import MaskedActionError, make_env, mask_rule
from recipes import dreamer
from torchrl_dreamer.dreamer.agent import DreamerPolicy, make_agent, preset
from torchrl_dreamer.dreamer.envs import make_dreamer_env
from torchrl_dreamer.dreamer.functional import unimix_masked_probs
from torchrl_dreamer.dreamer.imagination import ActionMaskHooks, ImaginationModule
from torchrl_dreamer.transforms import CategoricalToOneHot

from helpers import DREAMER_TINY, last_json, read_metrics

SIZES = preset("tiny", deter=32, hidden=16, units=16, stoch=4, classes=4, blocks=2)


@pytest.mark.smoke
@pytest.mark.parametrize("action_spec", ["categorical", "one_hot"])
@pytest.mark.parametrize("rule", [False, True])
def test_strict_masked_env_trains_through_prefill_collection_imagination_and_evaluation(
        action_spec, rule, tmp_runs, capsys):
    """The env raises MaskedActionError on any masked action: prefill (random), collection (the
    actor), imagination (learned head or the env's rule) and evaluation never trigger it."""
    run_dir = dreamer.main(["--env", "custom", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=160",
                            "eval.every=80", f"env.kwargs.action_spec={action_spec}",
                            *(["env.mask_rule=envs.masked_grid:mask_rule"] if rule else [])])
    rows = read_metrics(run_dir)
    last = rows[-1]
    assert last["train/updates"] > 0 and "eval/episode_reward_sum" in last
    acc = [r["diag/imagined_mask_accuracy"] for r in rows if "diag/imagined_mask_accuracy" in r]
    assert acc and all(0.0 <= a <= 1.0 for a in acc)
    assert "diag/reconstruction_action_mask" in last  # the mask head is trained on the replayed masks
    capsys.readouterr()
    dreamer.main(["--evaluate", str(run_dir), "eval.episodes=3"])
    assert last_json(capsys.readouterr().out)["eval/episodes"] == 3


def _biased_policy(mask_key):
    """A policy whose actor wants 'left' (action 3) almost surely: masked at the left edge."""
    torch.manual_seed(0)
    agent = make_agent({"observation": (4,), "action_mask": (5,)}, 5, True, SIZES, mask_key="action_mask")
    head = agent.actor.net.head if hasattr(agent.actor.net, "head") else agent.actor.net[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 20.0, 0.0]))
    return agent, DreamerPolicy(agent.world_model, agent.actor, mask_key=mask_key)


def _act(policy, env, steps, mode):
    from torchrl.envs import TensorDictPrimer

    env.append_transform(TensorDictPrimer(primers=policy.primer_specs(), default_value=0.0, expand_specs=True))
    td = env.reset()
    with set_exploration_type(mode):
        for _ in range(steps):
            td = policy(td)
            td, td = env.step_and_maybe_reset(td)


@pytest.mark.parametrize("mode", [ExplorationType.RANDOM, ExplorationType.DETERMINISTIC])
def test_10k_acting_steps_of_a_near_deterministic_actor_pick_no_masked_action(mode):
    env = make_dreamer_env(factory="envs.masked_grid:make_env", num_envs=100, seed=1)
    _, policy = _biased_policy("action_mask")
    _act(policy, env, 100, mode)  # 100 envs x 100 steps; the strict env raises on a masked action


def test_without_the_mask_the_same_actor_does_take_masked_actions():
    """The test above can fail: ignoring the mask, the biased actor walks into the wall at once."""
    env = make_dreamer_env(factory="envs.masked_grid:make_env", num_envs=100, seed=1)
    agent, _ = _biased_policy("action_mask")
    policy = DreamerPolicy(agent.world_model, agent.actor)
    policy.mask_key = None
    with pytest.raises(MaskedActionError):
        _act(policy, env, 100, ExplorationType.DETERMINISTIC)


def test_prefill_random_actions_respect_the_mask():
    env = make_dreamer_env(factory="envs.masked_grid:make_env", num_envs=50, seed=2)
    _, policy = _biased_policy("action_mask")
    policy.random_actions = True
    _act(policy, env, 100, ExplorationType.RANDOM)


def test_an_all_masked_state_is_a_clear_error():
    from torchrl_dreamer.pointer import AllMaskedError

    env = make_dreamer_env(factory="broken_envs:all_masked_after_reset", num_envs=3, seed=0)
    _, policy = _biased_policy("action_mask")
    with pytest.raises(AllMaskedError, match="allows no action in env 0"):
        _act(policy, env, 1, ExplorationType.RANDOM)


def test_unimix_then_mask_gives_exact_zeros_and_finite_log_probs():
    logits = torch.randn(64, 5) * 10
    mask = torch.rand(64, 5) > 0.5
    mask[:, 0] = True
    probs = unimix_masked_probs(logits, mask, 0.01)
    assert bool((probs[~mask] == 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    from torchrl_dreamer.dreamer.nets import OneHotDist

    dist = OneHotDist(probs)
    action = dist.sample()
    assert bool(mask[action.bool()].all()) and bool(torch.isfinite(dist.log_prob(action)).all())


@pytest.mark.parametrize("use_rule", [False, True])
def test_imagination_acts_only_within_the_imagined_masks(use_rule):
    torch.manual_seed(0)
    agent = make_agent({"observation": (4,), "action_mask": (5,)}, 5, True, SIZES, mask_key="action_mask")
    hooks = ActionMaskHooks(agent.world_model, rule=mask_rule if use_rule else None)
    imagination = ImaginationModule(agent.world_model, agent.actor, 6, hooks=hooks)
    from tensordict import TensorDict

    n = 32
    real = torch.ones(n, 5, dtype=torch.bool)
    real[:, 3] = False
    feat = torch.randn(n, agent.world_model.feat_dim)
    start = TensorDict({"deter": torch.zeros(n, 32), "stoch": F.one_hot(torch.zeros(n, 4, dtype=torch.long), 4).float(),
                        "is_terminal": torch.zeros(n, dtype=torch.bool), "action_mask": real, "feat": feat}, [n])
    traj = imagination(start)
    assert traj["action_mask"].shape == (n, 7, 5)
    assert bool((traj["action_mask"][:, 0] == real).all())  # the replayed mask at the start
    acted = traj["action"][:, :-1].bool()
    assert bool(traj["action_mask"][:, :-1][acted].all())  # never an action its imagined mask forbids
    assert bool(traj["action_mask"].any(-1).all())  # never an empty imagined action set
    assert 0.0 <= float(hooks.last_accuracy) <= 1.0


def test_the_rule_is_exact_on_the_envs_own_observations():
    env = make_env(num_envs=64, max_steps=0, device="cpu", seed=0)
    td = env.reset()
    for _ in range(20):
        assert torch.equal(mask_rule({"observation": td["observation"]}), td["action_mask"])
        td["action"] = torch.multinomial(td["action_mask"].float(), 1).squeeze(-1)
        td = env.step_and_maybe_reset(td)[1]


def test_categorical_specs_become_one_hot_once():
    env = make_dreamer_env(factory="envs.masked_grid:make_env", num_envs=2, seed=0)
    assert type(env.action_spec).__name__ == "OneHot" and env.action_spec.shape == (2, 5)
    assert sum(isinstance(t, CategoricalToOneHot) for t in env.transform) == 1
    env = make_dreamer_env(factory="envs.masked_grid:make_env", num_envs=2, seed=0,
                           kwargs={"action_spec": "one_hot"})
    assert not any(isinstance(t, CategoricalToOneHot) for t in env.transform)


def test_misnamed_key_at_start_up_is_one_line_exit_2(tmp_runs, capsys):
    from torchrl_dreamer.runtime import run_cli

    for main in (dreamer.main, __import__("recipes.ppo", fromlist=["main"]).main):
        with pytest.raises(SystemExit) as info:
            run_cli(main, ["env.factory=broken_envs:misnamed_key", f"run.root={tmp_runs}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1
        assert "[observation_key] observation key 'observation' is not in the env's observation spec" in err[0]
    assert not tmp_runs.exists()


def test_reward_scale_scales_the_replay_not_the_logged_sums(tmp_runs):
    run_dir = dreamer.main(["--env", "custom", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=64",
                            "eval.every=0", "env.reward_scale=10"])
    assert read_metrics(run_dir)[-1]["train/env_steps"] >= 64
    from torchrl_dreamer.dreamer.replay import SequenceWriter
    from tensordict import TensorDict

    w = SequenceWriter({}, lambda a: a, 1, reward_scale=10.0)
    batch = TensorDict({"action": torch.zeros(1, 2, 1), "is_first": torch.tensor([[True, False]]),
                        "next": {"reward": torch.tensor([[0.5, 0.25]]), "done": torch.zeros(1, 2, dtype=torch.bool),
                                 "terminated": torch.zeros(1, 2, dtype=torch.bool)}}, [1, 2])
    rows = w(batch)
    assert rows["reward"].tolist() == [0.0, 5.0]


def test_an_env_of_the_wrong_shape_is_told_which_recipe_fits(tmp_runs):
    from torchrl_dreamer.config import ConfigError

    with pytest.raises(ConfigError, match=r"\[agents\] .*multi-agent env.*train it with MAPPO"):
        dreamer.main(["env.factory=envs.goal_reaching:make_env", f"run.root={tmp_runs}"])
    from recipes.mappo_vmas import main as mappo_main

    with pytest.raises(ConfigError, match=r"\[agents\] .*single-agent env.*--algo dreamer or ppo"):
        mappo_main(["--env", "custom", "env.factory=envs.masked_grid:make_env", "env.kwargs={}", f"run.root={tmp_runs}"])
    assert not tmp_runs.exists()
