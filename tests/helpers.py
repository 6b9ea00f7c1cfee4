"""Settings and small helpers shared by the tests (one place instead of test-to-test imports).

Imported as a top-level module (``from helpers import DREAMER_TINY``): ``tests/conftest.py`` puts
``tests/`` on ``sys.path``, like ``scripted_env``.

The ``*_TINY`` lists are recipe overrides that make a run take seconds on one CPU thread; a test
adds what it is about (steps, evaluation, resume) after them.
"""
from __future__ import annotations

import json
from pathlib import Path

#: the repository root (``tests/`` is one level below it)
REPO = Path(__file__).resolve().parents[1]
#: the benchmark scripts some tests import (``monkeypatch.syspath_prepend(BENCHMARKS)``)
BENCHMARKS = REPO / "benchmarks"

# --- recipes.dreamer (Gymnasium envs) ----------------------------------------------------------
DREAMER_TINY = [
    "model.size=tiny", "model.deter=32", "model.hidden=16", "model.units=16", "model.stoch=4", "model.classes=4",
    "model.blocks=2", "model.cnn_depth=4", "replay.batch_size=2", "replay.seq_len=8", "replay.train_ratio=16",
    "replay.prefill=40", "env.num_envs=2", "train.steps_per_collect=8", "eval.episodes=2", "run.progress=false",
    "run.tensorboard=false", "run.log_every=16", "ac.horizon=3", "threads=1", "optim.warmup_steps=0",
    "model.compile=false",  # the CartPole YAML compiles; smoke tests run eagerly (compile is tested on its own)
    "eval.confirm_episodes=0",  # the end-of-run re-scoring has its own test
]

# --- recipes.dreamer_routing (``recipes.routing --algo dreamer``) --------------------------------
#: network sizes and quiet logging only; tests add iterations, replay and evaluation settings
DREAMER_ROUTING_TINY = [
    "model.embed_dim=16", "model.heads=2", "model.ff_dim=32", "model.encoder_layers=1", "model.deter=16",
    "model.hidden=8", "model.units=16", "model.stoch=4", "model.classes=4", "model.blocks=2", "model.action_dim=8",
    "run.progress=false", "run.tensorboard=false", "threads=1", "optim.warmup_steps=0",
]

# --- recipes.ppo_routing (``recipes.routing --algo ppo``) ----------------------------------------
#: one iteration of a tiny pointer network, no evaluation during training (no ``--env``)
PPO_ROUTING_TINY = [
    "train.iterations=1", "eval.every=0", "ppo.batch_instances=8", "ppo.minibatch_instances=8", "ppo.epochs=1",
    "model.embed_dim=16", "model.n_layers=1", "model.n_heads=2", "model.ff_dim=32", "run.progress=false",
    "run.tensorboard=false", "threads=1",
]
#: a complete TSP20 run without a dev set (checkpoint only; the fastest recipe run there is)
PPO_ROUTING_TSP_RUN = [
    "--env", "tsp20", "train.iterations=1", "eval.every=0", "env.dev_set=''", "ppo.batch_instances=8",
    "ppo.minibatch_instances=8", "ppo.epochs=1", "model.embed_dim=16", "model.n_layers=1", "model.n_heads=2",
    "model.ff_dim=16", "run.progress=false", "run.tensorboard=false", "threads=1",
]

# --- recipes.ppo (single-agent PPO; ``recipes.dreamer --algo ppo``) ------------------------------
PPO_TINY = [
    "env.num_envs=2", "train.steps_per_env=16", "ppo.minibatch_size=16", "ppo.epochs=1", "model.hidden=16",
    "eval.episodes=2", "run.progress=false", "run.tensorboard=false", "run.log_every=32", "threads=1",
    "model.cnn_depth=4", "eval.confirm_episodes=0",  # the end-of-run re-scoring has its own test
]

# --- recipes.mappo_vmas ------------------------------------------------------------------------
MAPPO_TINY = [
    "collector.iterations=2", "ppo.epochs=1", "ppo.compile=false", "model.width=16", "eval.every=1",
    "eval.num_envs=2", "run.progress=false", "run.tensorboard=false",
]


def mappo_tiny(max_steps: int = 10, n_envs: int = 2, minibatch: int = 10) -> list[str]:
    """:data:`MAPPO_TINY` plus a batch of ``n_envs`` episodes of ``max_steps`` steps."""
    return [*MAPPO_TINY, f"env.max_steps={max_steps}", f"collector.frames_per_batch={max_steps * n_envs}",
            f"ppo.minibatch_size={minibatch}"]


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def last_json(out: str) -> dict:
    """The JSON record on the last line printed (what ``--evaluate`` prints)."""
    return json.loads(out.strip().splitlines()[-1])
