"""``eval.recheck_episodes``: a periodic evaluation that beats the best plays more episodes with the
same weights, and the pooled score decides ``best.pt`` (both single-agent recipes)."""
import math

import pytest

from recipes import dreamer, ppo
from torchrl_dreamer.checkpoint import load_checkpoint
from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.evaluation import pool_episodes, recheck, recheck_rounds

from helpers import DREAMER_TINY, PPO_TINY, read_metrics


def test_pool_episodes_weights_each_result_by_its_finished_episodes():
    pooled = pool_episodes([
        {"eval/episode_reward_sum": 10.0, "eval/episode_length": 5.0, "eval/episodes": 2.0},
        {"eval/episode_reward_sum": 40.0, "eval/episode_length": 20.0, "eval/episodes": 1.0},
        {"eval/episode_reward_sum": math.nan, "eval/episode_length": 7.0, "eval/episodes": 0.0},
    ])
    assert pooled == {"eval/episode_reward_sum": 20.0, "eval/episode_length": 10.0, "eval/episodes": 3.0}
    none = pool_episodes([{"eval/episode_reward_sum": math.nan, "eval/episode_length": 3.0, "eval/episodes": 0.0}])
    assert math.isnan(none["eval/episode_reward_sum"]) and none["eval/episodes"] == 0.0
    assert [recheck_rounds(40, 10), recheck_rounds(41, 10), recheck_rounds(3, 2), recheck_rounds(0, 10)] == [4, 5, 2, 0]


def test_recheck_plays_enough_rounds_and_names_the_pool():
    played = []
    first = {"eval/episode_reward_sum": 10.0, "eval/episode_length": 4.0, "eval/episodes": 10.0}
    out = recheck(first, lambda i: played.append(i) or {"eval/episode_reward_sum": 20.0 + i,
                                                        "eval/episode_length": 4.0, "eval/episodes": 10.0},
                  episodes=25, per_round=10)
    assert played == [0, 1, 2]
    assert out == {"eval/recheck_episode_reward_sum": (10.0 + 20.0 + 21.0 + 22.0) / 4,
                   "eval/recheck_episode_length": 4.0, "eval/recheck_episodes": 40.0}


# scores the fake evaluation gives, in call order: each periodic evaluation, then its recheck rounds
# (2 rounds of 2 episodes for eval.recheck_episodes=3 and eval.episodes=2); every call "finishes" 2 episodes
SCRIPT = [
    10.0, 0.0, 2.0,   # first evaluation: a new best (10 > -inf); pooled (10 + 0 + 2) / 3 = 4 -> best.pt
    3.0,              # below the best (4): no recheck
    8.0, 20.0, 20.0,  # above 4: pooled 16 -> best.pt replaced
    17.0, 0.0, 1.0,   # above 16 on its own episodes, pooled 6: best.pt stays
]
POOLED = [4.0, None, 16.0, 6.0]
BEST = [4.0, 4.0, 16.0, 16.0]


def scripted(calls: list):
    script = list(SCRIPT)

    def fake_run_episodes(policy, env, **kwargs):
        calls.append(kwargs.get("actions"))
        score = script.pop(0) if script else -100.0  # evaluations past the script never beat the best
        return {"eval/episode_reward_sum": score, "eval/episode_length": 5.0, "eval/episodes": 2.0}
    return fake_run_episodes


@pytest.mark.parametrize("recipe, args, steps", [
    (dreamer, [*DREAMER_TINY, "train.env_steps=128", "eval.every=32"], "train/env_steps"),
    (ppo, [*PPO_TINY, "train.env_steps=128", "eval.every=32"], "train/env_steps"),
], ids=["dreamer", "ppo"])
def test_recheck_episodes_decide_best_pt(recipe, args, steps, tmp_runs, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "run_episodes", scripted(calls))
    run_dir = recipe.main(["--env", "cartpole", *args, f"run.root={tmp_runs}", "env.max_episode_steps=30",
                           "eval.recheck_episodes=3"])
    evals = [r for r in read_metrics(run_dir) if "eval/episode_reward_sum" in r][:4]
    assert [r["eval/episode_reward_sum"] for r in evals] == [10.0, 3.0, 8.0, 17.0]
    assert [r.get("eval/recheck_episode_reward_sum") for r in evals] == POOLED
    assert [r.get("eval/recheck_episodes") for r in evals] == [6.0, None, 6.0, 6.0]
    assert [r["eval/best_episode_reward_sum"] for r in evals] == BEST
    best = load_checkpoint(run_dir / "best.pt")
    assert best["eval/episode_reward_sum"] == 16.0 and best["eval/episodes"] == 6.0
    assert best["env_steps"] == evals[2][steps]
    assert len(calls) >= len(SCRIPT)


@pytest.mark.parametrize("recipe, args", [(dreamer, DREAMER_TINY), (ppo, PPO_TINY)], ids=["dreamer", "ppo"])
def test_without_recheck_best_pt_follows_the_evaluation_score(recipe, args, tmp_runs, monkeypatch):
    """eval.recheck_episodes=0 (the default): one call per evaluation, best.pt on its score alone."""
    calls = []
    monkeypatch.setattr(recipe, "run_episodes", scripted(calls))
    run_dir = recipe.main(["--env", "cartpole", *args, "train.env_steps=128", "eval.every=32",
                           f"run.root={tmp_runs}", "env.max_episode_steps=30"])
    evals = [r for r in read_metrics(run_dir) if "eval/episode_reward_sum" in r]
    assert not any("eval/recheck_episode_reward_sum" in r for r in evals)
    scores = [r["eval/episode_reward_sum"] for r in evals]
    assert scores == SCRIPT[:len(scores)] and len(calls) == len(evals)
    assert load_checkpoint(run_dir / "best.pt")["eval/episode_reward_sum"] == max(scores)


@pytest.mark.parametrize("main", [dreamer.main, ppo.main])
def test_negative_recheck_episodes_is_a_config_error(main, tmp_runs):
    with pytest.raises(ConfigError, match="eval.recheck_episodes"):
        main(["--env", "cartpole", f"run.root={tmp_runs}", "eval.recheck_episodes=-1"])
