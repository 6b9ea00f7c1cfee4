"""The single-agent PPO recipe (TorchRL ClipPPOLoss + GAE) and the Dreamer <-> PPO swap."""
import json

import pytest
import torch

from recipes import dreamer, ppo
from recipes.routing import main as routing_main
from torchrl_dreamer.checkpoint import load_checkpoint
from torchrl_dreamer.config import ConfigError

from helpers import DREAMER_TINY, PPO_ROUTING_TINY, PPO_TINY, last_json, read_metrics

#: the metrics both single-agent algorithms log (one TensorBoard compares them)
SHARED_METRICS = ("train/episode_reward_sum", "train/env_steps", "eval/episode_reward_sum", "eval/episode_length",
                  "time/total_s")


@pytest.mark.smoke
@pytest.mark.parametrize("env_name", ["cartpole", "pendulum", "lunarlander", "cartpole_pixels", "custom"])
def test_ppo_smoke_every_env_yaml(env_name, tmp_runs, device_args):
    run_dir = ppo.main(["--env", env_name, *PPO_TINY, f"run.root={tmp_runs}", "train.env_steps=64",
                        "eval.every=32", "env.max_episode_steps=20", *device_args])
    last = read_metrics(run_dir)[-1]
    assert last["train/env_steps"] >= 64 and last["train/iterations"] >= 2
    assert all(k in last for k in ("loss/objective", "loss/critic", "loss/entropy", *SHARED_METRICS))
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "curves.png").is_file()
    assert run_dir.parts[-3] == "ppo"


@pytest.mark.smoke
def test_algo_ppo_from_the_dreamer_command_on_cartpole_and_a_custom_factory(tmp_runs):
    run_dir = dreamer.main(["--algo", "ppo", "--env", "cartpole", *PPO_TINY, f"run.root={tmp_runs}",
                            "train.env_steps=32", "eval.every=0", "env.max_episode_steps=20"])
    assert run_dir.parts[-3:-1] == ("ppo", "CartPole-v1")
    # a factory without --env: the neutral custom YAML, not CartPole's
    run_dir = dreamer.main(["--algo", "ppo", "env.factory=envs.masked_grid:make_env", *PPO_TINY,
                            f"run.root={tmp_runs}", "train.env_steps=32", "eval.every=0"])
    assert run_dir.parts[-3:-1] == ("ppo", "envs.masked_grid.make_env")
    # and back: --algo dreamer from the PPO command
    run_dir = ppo.main(["--algo", "dreamer", "--env", "custom", *DREAMER_TINY, f"run.root={tmp_runs}",
                        "train.env_steps=48", "eval.every=0"])
    assert run_dir.parts[-3] == "dreamer"


@pytest.mark.smoke
def test_algo_ppo_on_a_routing_env(tmp_runs):
    run_dir = routing_main(["--algo", "ppo", "--env", "tsp20", *PPO_ROUTING_TINY, f"run.root={tmp_runs}",
                            "env.dev_set=''"])
    assert (run_dir / "checkpoint.pt").is_file()


@pytest.mark.smoke
def test_resume_and_evaluate_need_no_algo(tmp_runs, capsys):
    args = [*PPO_TINY, f"run.root={tmp_runs}", "eval.every=0", "env.max_episode_steps=20"]
    run_dir = ppo.main(["--env", "cartpole", *args, "train.env_steps=32"])
    resumed = dreamer.main(["--resume", str(run_dir), "train.env_steps=64"])  # the run says: PPO
    assert resumed == run_dir and load_checkpoint(run_dir)["env_steps"] >= 64
    steps = [r["train/env_steps"] for r in read_metrics(run_dir)]
    assert steps == sorted(steps)
    capsys.readouterr()
    dreamer.main(["--evaluate", str(run_dir), "eval.episodes=2"])
    record = last_json(capsys.readouterr().out)
    assert record["env_steps"] >= 64 and "eval/episode_reward_sum" in record
    assert json.loads((run_dir / "eval.json").read_text())["env_steps"] == record["env_steps"]
    with pytest.raises(ConfigError, match="is a ppo run: use --algo ppo"):
        dreamer.main(["--algo", "dreamer", "--resume", str(run_dir), "train.env_steps=96"])


@pytest.mark.smoke
@pytest.mark.parametrize("action_spec", ["categorical", "one_hot"])
def test_ppo_on_a_strict_masked_env_never_takes_a_masked_action(action_spec, tmp_runs):
    """envs.masked_grid raises on a masked action: PPO's MaskedOneHotCategorical never picks one,
    in collection and in evaluation, with either discrete spec kind."""
    run_dir = ppo.main(["--env", "custom", *PPO_TINY, f"run.root={tmp_runs}", "train.env_steps=256",
                        "eval.every=128", f"env.kwargs.action_spec={action_spec}"])
    last = read_metrics(run_dir)[-1]
    assert last["train/env_steps"] >= 256 and "eval/episode_reward_sum" in last


def test_ppo_on_cartpole_learns(tmp_runs):
    """A few thousand steps of the CartPole YAML beat a random policy (~22) clearly: learning, not
    just running (the full YAML reaches 500; benchmarks/dreamer_vs_ppo.py)."""
    run_dir = ppo.main(["--env", "cartpole", f"run.root={tmp_runs}", "run.progress=false", "run.tensorboard=false",
                        "train.env_steps=15360", "eval.every=5120", "eval.episodes=5"])
    best = max(r["eval/episode_reward_sum"] for r in read_metrics(run_dir) if "eval/episode_reward_sum" in r)
    assert best > 100


def test_ppo_config_errors_name_the_key(tmp_runs):
    with pytest.raises(ConfigError, match="ppo.minibatch_size"):
        ppo.main([*PPO_TINY, f"run.root={tmp_runs}", "ppo.minibatch_size=1000"])
    with pytest.raises(ConfigError, match="env.mask_rule is a Dreamer setting"):
        ppo.main([*PPO_TINY, f"run.root={tmp_runs}", "env.mask_rule=envs.masked_grid:mask_rule"])
    assert not tmp_runs.exists()


def test_ppo_networks_run_on_plain_tensors_and_the_loss_trains_both_towers():
    from torchrl.envs import GymEnv

    nets = ppo.PPONetworks([(4,)], 2, False, ppo.PPOModelConfig(hidden=8))
    assert nets.actor(torch.zeros(3, 4)).shape == (3, 2) and nets.critic(torch.zeros(3, 4)).shape == (3, 1)
    cfg = ppo.PPOConfig()
    env = GymEnv("CartPole-v1")
    nets, actor, critic, _ = ppo.build_agent(cfg, env)
    loss, gae = ppo.build_loss(cfg, actor, critic)
    with torch.no_grad():
        batch = env.rollout(20, actor)
        gae(batch)
    out = loss(batch)
    (out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]).backward()
    for tower in (nets.actor, nets.critic):  # every parameter of both towers gets a gradient
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tower.parameters())
    assert not set(map(id, nets.actor.parameters())) & set(map(id, nets.critic.parameters()))


def test_ppo_run_ends_by_rescoring_final_and_best_weights_and_naming_the_better(tmp_runs, capsys, monkeypatch):
    """eval.confirm_episodes (as the Dreamer recipe): the final weights and best.pt are scored on the
    same fresh episodes; result.json names the better file; the run's final weights stay in place."""
    scored = []
    real = ppo.run_episodes

    def spy(policy, env, **kw):
        out = real(policy, env, **kw)
        scored.append((env.batch_size.numel(), [p.detach().clone() for p in policy.parameters()], out))
        return out

    monkeypatch.setattr(ppo, "run_episodes", spy)
    run_dir = ppo.main(["--env", "cartpole", *PPO_TINY, f"run.root={tmp_runs}", "train.env_steps=96",
                        "eval.every=32", "env.max_episode_steps=30", "eval.confirm_episodes=3"])
    result = json.loads((run_dir / "result.json").read_text())
    best = load_checkpoint(run_dir / "best.pt")
    assert result["episodes"] == 3 and result["final"]["file"] == "checkpoint.pt" and result["best"]["file"] == "best.pt"
    assert result["best"]["env_steps"] == best["env_steps"]
    assert result["best"]["eval_when_saved"] == best["eval/episode_reward_sum"]
    confirm = [s for s in scored if s[0] == 3]  # the periodic evaluations use eval.episodes=2 envs
    assert len(confirm) == 2
    assert result["final"]["episode_reward_sum"] == confirm[0][2]["eval/episode_reward_sum"]
    assert result["best"]["episode_reward_sum"] == confirm[1][2]["eval/episode_reward_sum"]
    better = "best.pt" if result["best"]["episode_reward_sum"] > result["final"]["episode_reward_sum"] else "checkpoint.pt"
    assert result["use"] == better and f"-> use {run_dir / better}" in capsys.readouterr().out
    final = load_checkpoint(run_dir)["networks"]
    assert any(torch.equal(confirm[0][1][0], v) for v in final.values())  # first scored: the final weights
    assert any(torch.equal(confirm[1][1][0], v) for v in best["networks"].values())  # then best.pt's
