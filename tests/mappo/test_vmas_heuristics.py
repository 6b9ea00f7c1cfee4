"""Scripted reference policies (baselines/vmas_heuristics.py) through the MAPPO recipe's evaluation."""
from __future__ import annotations

import pytest
import torch

from baselines.vmas_heuristics import HEURISTICS, reference_policy
from recipes import mappo_vmas
from torchrl_dreamer.cli import parse_recipe_args
from torchrl_dreamer.config import to_object


def _env_and_cfg(scenario: str, num_envs: int = 8, max_steps: int | None = None):
    extra = [f"env.max_steps={max_steps}"] if max_steps else []
    cfg = to_object(parse_recipe_args(["--env", scenario, *extra], schema=mappo_vmas.MAPPOConfig,
                                      config_dir=mappo_vmas.CONFIG_DIR, description="", default_env="navigation").cfg)
    return mappo_vmas.make_env_from_config(cfg, num_envs=num_envs, seed=cfg.seed + 20_000), cfg


def _score(scenario: str, rule: str, max_steps: int) -> float:
    """Mean episode reward sum of 8 episodes of ``max_steps`` steps (the recipe's evaluation)."""
    torch.manual_seed(0)
    env, cfg = _env_and_cfg(scenario, max_steps=max_steps)
    try:
        return mappo_vmas.evaluate(reference_policy(rule, env), env, cfg.env.max_steps)[
            "eval/episode_reward_sum"]
    finally:
        env.close()


def test_actions_stay_in_bounds_and_do_nothing_is_zero():
    env, _ = _env_and_cfg("wheel", num_envs=3)
    try:
        td = env.reset()
        spec = env.full_action_spec["agents", "action"]
        for rule in ("do_nothing", "random", "wheel", "wheel_push"):
            action = reference_policy(rule, env)(td.clone())["agents", "action"]
            assert action.shape == spec.shape
            assert bool((action >= spec.space.low).all() and (action <= spec.space.high).all())
            if rule == "do_nothing":
                assert not action.any()
    finally:
        env.close()


def test_unknown_rule_and_wrong_observation_width_are_clear_errors():
    env, _ = _env_and_cfg("wheel", num_envs=2)
    try:
        with pytest.raises(ValueError, match="unknown reference policy 'spin'.*wheel_push"):
            reference_policy("spin", env)
        policy = reference_policy("buzz_wire", env)  # wheel observations have 13 features, not 6
        with pytest.raises(ValueError, match="expects 6 observation features per agent.*gives 13"):
            policy(env.reset())
    finally:
        env.close()
    assert set(HEURISTICS) >= {"wheel", "wheel_push", "buzz_wire", "reverse_transport"}


def test_buzz_wire_heuristic_climbs_without_touching_the_wire():
    """Doing nothing scores 0, random actions hit the wire (-10 per touch); the heuristic climbs."""
    assert _score("buzz_wire", "do_nothing", 60) == pytest.approx(0.0, abs=1e-6)
    assert _score("buzz_wire", "buzz_wire", 60) > 0.3


def test_wheel_push_beats_doing_nothing():
    """Doing nothing scores -0.05 per step; the push heuristic turns the line towards 0.05 rad/s."""
    nothing, push = _score("wheel", "do_nothing", 60), _score("wheel", "wheel_push", 60)
    assert nothing == pytest.approx(-0.05 * 60, abs=0.05)
    assert push > nothing + 0.5
