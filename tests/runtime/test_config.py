"""Layered config: errors name the key and list the valid ones; types are enforced."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipes.mappo_vmas import CONFIG_DIR, MAPPOConfig, main
from torchrl_dreamer.cli import parse_recipe_args
from torchrl_dreamer.config import ConfigError, help_text, load_config, save_config, to_object

BASE = [CONFIG_DIR / "base.yaml", CONFIG_DIR / "navigation.yaml"]


def test_layers_merge_in_order(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("ppo:\n  lr: 0.002\n")
    cfg = to_object(load_config(MAPPOConfig, [*BASE, extra], ["ppo.epochs=3", "env.kwargs.n_agents=5"]))
    assert cfg.ppo.lr == 0.002  # extra YAML over base
    assert cfg.ppo.epochs == 3  # CLI over YAML
    assert cfg.env.kwargs == {"n_agents": 5}
    assert cfg.collector.frames_per_batch == 6000  # from navigation.yaml


def test_unknown_cli_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(MAPPOConfig, BASE, ["ppo.learning_rate=1e-3"])
    msg = str(err.value)
    assert "ppo.learning_rate" in msg and "command-line" in msg
    assert "lr" in msg and "clip_epsilon" in msg  # the valid keys at that level


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("collector:\n  frames_per_batch: 100\n  iters: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(MAPPOConfig, [*BASE, bad])
    assert "collector.iters" in str(err.value) and str(bad) in str(err.value)
    assert "iterations" in str(err.value)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="Valid keys at the top level: seed, device"):
        load_config(MAPPOConfig, BASE, ["sed=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="wrong type for config key 'ppo.epochs'"):
        load_config(MAPPOConfig, BASE, ["ppo.epochs=many"])
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(MAPPOConfig, BASE, ["model.share_policy_params=maybe"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(MAPPOConfig, BASE, ["ppo.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(MAPPOConfig, [tmp_path / "nope.yaml"])


def test_config_is_read_only_and_saved(tmp_path):
    cfg = load_config(MAPPOConfig, BASE, ["seed=7"])
    with pytest.raises(Exception):
        cfg.seed = 3
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(MAPPOConfig, [tmp_path / "config.yaml"])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_help_lists_every_field_with_docs():
    text = help_text(MAPPOConfig)
    for key in ("ppo.lr", "ppo.minibatch_size", "env.factory", "model.centralised_critic", "run.checkpoint_every"):
        assert key in text
    assert "Adam learning rate" in text


def test_every_yaml_only_sets_known_keys():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(MAPPOConfig, [CONFIG_DIR / "base.yaml", path])


def test_unknown_env_yaml_and_unknown_scenario_fail_before_work(tmp_runs):
    with pytest.raises(ConfigError, match="Available: .*navigation"):
        parse_recipe_args(["--env", "navigaton"], schema=MAPPOConfig, config_dir=CONFIG_DIR,
                          description="", default_env="navigation")
    with pytest.raises(ConfigError, match="unknown VMAS scenario 'navigaton'"):
        main(["--env", "navigation", "env.scenario=navigaton", f"run.root={tmp_runs}"])
    assert not Path(tmp_runs).exists()  # nothing was created


def test_bad_factory_fails_clearly(tmp_runs):
    with pytest.raises(ValueError, match="cannot import module"):
        main(["--env", "custom", "env.factory=no_such_pkg.mod:make", f"run.root={tmp_runs}"])
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        main(["--env", "custom", "env.factory=envs.goal_reaching:nope", f"run.root={tmp_runs}"])
    with pytest.raises(ConfigError, match=r"bogus=1.*TypeError"):
        main(["--env", "custom", "env.kwargs.bogus=1", f"run.root={tmp_runs}"])
    assert not Path(tmp_runs).exists()  # the factory is built before the run directory


def test_override_replaces_mappings():
    cfg = load_config(MAPPOConfig, BASE, ["env.kwargs={}"])
    assert dict(cfg.env.kwargs) == {}
    cfg = load_config(MAPPOConfig, BASE, ["env.kwargs={n_agents: 4, shared_rew: false}"])
    assert dict(cfg.env.kwargs) == {"n_agents": 4, "shared_rew": False}


@pytest.mark.parametrize("override, message", [
    ("ppo.impl=fast", "ppo.impl must be one of fused, torchrl"),
    ("model.activation=gelu", "model.activation must be one of"),
    ("ppo.critic_loss=huber", "ppo.critic_loss must be one of"),
    ("ppo.epochs=0", "ppo.epochs must be >= 1"),
    ("collector.frames_per_batch=6050", "must be a multiple of env.max_steps"),
    ("ppo.minibatch_size=7000", "exceeds collector.frames_per_batch"),
])
def test_invalid_values_fail_before_any_work(override, message, tmp_runs):
    with pytest.raises(ConfigError, match=message):
        main(["--env", "navigation", override, f"run.root={tmp_runs}"])
    assert not Path(tmp_runs).exists()
