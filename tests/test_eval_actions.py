"""``eval.actions``: evaluations with the actor's mode or with sampled actions (run_episodes, both
single-agent recipes, the benchmark that compares the two)."""
import json
import sys

import pytest
import torch
from torch import nn
from torchrl.envs import GymEnv, SerialEnv, TransformedEnv
from torchrl.envs.utils import ExplorationType, exploration_type

from recipes import dreamer, ppo
from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.evaluation import EvalActions, run_episodes
from torchrl_dreamer.transforms import EpisodeRewardSum

from helpers import BENCHMARKS, DREAMER_TINY, PPO_TINY


class CoinPolicy(nn.Module):
    """Left or right: the mode is always 0; a sample is a coin flip from torch's global generator.
    Records the exploration type it was called under."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen = set()

    def forward(self, td):
        kind = exploration_type()
        self.seen.add(kind)
        n = td.batch_size.numel()
        pick = torch.zeros(n, dtype=torch.long) if kind != ExplorationType.RANDOM else torch.randint(0, 2, (n,))
        td.set("action", nn.functional.one_hot(pick, 2).reshape(*td.batch_size, 2))
        return td


def cartpole(n: int = 3, seed: int = 0) -> TransformedEnv:
    base = SerialEnv(n, lambda: GymEnv("CartPole-v1"))
    env = TransformedEnv(base, EpisodeRewardSum(base))
    env.set_seed(seed)
    return env


def test_run_episodes_picks_the_exploration_type_and_rejects_unknown_actions():
    for actions, kind in (("mode", ExplorationType.DETERMINISTIC), ("sample", ExplorationType.RANDOM),
                          (EvalActions.sample, ExplorationType.RANDOM)):
        policy, env = CoinPolicy(), cartpole()
        out = run_episodes(policy, env, actions=actions)
        assert policy.seen == {kind} and out["eval/episodes"] == 3
    # always-left falls over within ~10 steps; a coin flip keeps CartPole up longer on average
    mode = run_episodes(CoinPolicy(), cartpole(8), actions="mode")
    sample = run_episodes(CoinPolicy(), cartpole(8), actions="sample", seed=0)
    assert mode["eval/episode_length"] < 11 < sample["eval/episode_length"]
    with pytest.raises(ValueError, match="actions must be one of mode, sample; got 'greedy'"):
        run_episodes(CoinPolicy(), cartpole(), actions="greedy")


def test_seeded_run_episodes_repeats_and_leaves_the_callers_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run_episodes(CoinPolicy(), cartpole(seed=1), actions="sample", seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = run_episodes(CoinPolicy(), cartpole(seed=1), actions="sample", seed=7)
    assert a == b
    run_episodes(CoinPolicy(), cartpole(seed=1), actions="sample")  # unseeded: draws from the caller's stream
    assert not torch.equal(torch.get_rng_state(), before)


@pytest.mark.smoke
def test_dreamer_sampled_periodic_evaluations_leave_the_training_stream_alone(tmp_runs, monkeypatch):
    """With eval.actions=sample every evaluation (periodic, end-of-run, --evaluate) samples, and the
    periodic ones draw from generators of their own: runs whose evaluations play different numbers of
    episodes train to the same weights."""
    asked = []
    real = dreamer.run_episodes
    monkeypatch.setattr(dreamer, "run_episodes", lambda *a, **k: asked.append(k["actions"]) or real(*a, **k))
    weights = []
    for episodes in (1, 3):
        run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}/e{episodes}",
                                "train.env_steps=96", "eval.every=32", "env.max_episode_steps=30",
                                "eval.actions=sample", f"eval.episodes={episodes}", "eval.confirm_episodes=2"])
        weights.append(torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"])
    assert set(asked) == {"sample"} and len(asked) >= 2 * (3 + 2)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    asked.clear()
    dreamer.main(["--evaluate", str(run_dir), "eval.episodes=2"])  # the run's config.yaml says sample
    assert asked == ["sample"]
    dreamer.main(["--evaluate", str(run_dir), "eval.episodes=2", "eval.actions=mode"])
    assert asked == ["sample", "mode"]


@pytest.mark.smoke
def test_ppo_evaluations_follow_eval_actions(tmp_runs, monkeypatch, capsys):
    asked = []
    real = ppo.run_episodes
    monkeypatch.setattr(ppo, "run_episodes", lambda *a, **k: asked.append(k.get("actions")) or real(*a, **k))
    run_dir = ppo.main(["--env", "cartpole", *PPO_TINY, f"run.root={tmp_runs}", "train.env_steps=96",
                        "eval.every=32", "env.max_episode_steps=30", "eval.confirm_episodes=2", "eval.actions=sample"])
    assert asked and set(asked) == {"sample"}
    asked.clear()
    ppo.main(["--evaluate", str(run_dir), "eval.episodes=2", "eval.actions=mode"])
    assert asked == ["mode"]


@pytest.mark.parametrize("main", [dreamer.main, ppo.main])
def test_unknown_eval_actions_is_a_config_error(main, tmp_runs):
    with pytest.raises(ConfigError, match="eval.actions"):
        main(["--env", "cartpole", f"run.root={tmp_runs}", "eval.actions=greedy"])


@pytest.mark.smoke
def test_eval_actions_benchmark_scores_both_ways_on_the_rescore_episodes(tmp_runs, tmp_path, monkeypatch, capsys):
    """benchmarks/eval_actions.py: the mode column repeats the run's result.json (same episodes, same
    weights), the sample column plays the same episodes with sampled actions."""
    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=96",
                            "eval.every=32", "env.max_episode_steps=30", "eval.confirm_episodes=3"])
    result = json.loads((run_dir / "result.json").read_text())
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("eval_actions", None)
    import eval_actions

    out = eval_actions.main([str(run_dir), "--episodes", "3", "--out", str(tmp_path / "ea")])
    assert json.loads((tmp_path / "ea.json").read_text())["summary"] == out["summary"]
    by_file = {r["weights"]: r for r in out["rows"]}
    assert set(by_file) == {"checkpoint.pt", "best.pt"}
    for key in ("final", "best"):
        row = by_file[result[key]["file"]]
        assert row["mode"]["episode_reward_sum"] == result[key]["episode_reward_sum"]
        assert row["mode"]["episode_length"] == result[key]["episode_length"]
    assert out["summary"]["checkpoints"] == 2
    assert "| mode | sample |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a run directory"):
        eval_actions.main([str(tmp_path), "--out", str(tmp_path / "x")])
