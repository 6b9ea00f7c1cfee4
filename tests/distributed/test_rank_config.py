"""The per-rank config of a data-parallel run (no process group needed: pure arithmetic)."""
import pytest

from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.distributed import SINGLE, DataParallel, rank_config
from recipes import ppo_routing


def _cfg(*overrides):
    from torchrl_dreamer.cli import parse_recipe_args
    from torchrl_dreamer.config import to_object

    args = parse_recipe_args(["--env", "tsp20", *overrides], schema=ppo_routing.PPORoutingConfig,
                             config_dir=ppo_routing.CONFIG_DIR, description="", default_env="tsp20",
                             env_config_dir=ppo_routing.ENV_CONFIG_DIR)
    return to_object(args.cfg)


def test_global_counts_split_over_the_ranks_and_cuda_gets_the_local_device():
    cfg = _cfg("ppo.batch_instances=512", "ppo.minibatch_instances=128", "device=cuda")
    dp = DataParallel(rank=1, world_size=4, local_rank=1)
    local = rank_config(cfg, dp, ("ppo.batch_instances", "ppo.minibatch_instances"))
    assert (local.ppo.batch_instances, local.ppo.minibatch_instances, local.device) == (128, 32, "cuda:1")
    assert (cfg.ppo.batch_instances, cfg.device) == (512, "cuda")  # the global config is untouched
    assert rank_config(cfg, SINGLE, ("ppo.batch_instances",)) is cfg


def test_a_count_that_does_not_split_names_the_key():
    cfg = _cfg("ppo.batch_instances=510")
    with pytest.raises(ConfigError, match=r"ppo.batch_instances=510 does not split over 4 data-parallel ranks"):
        rank_config(cfg, DataParallel(rank=0, world_size=4), ("ppo.batch_instances",))
