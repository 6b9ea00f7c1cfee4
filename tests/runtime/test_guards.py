"""Non-finite guards: they stop before anything bad is written, and say truthfully what is left."""
from __future__ import annotations

import math

import pytest
import torch

import recipes.ppo_routing as ppo_routing
import recipes.dreamer as dreamer
from torchrl_dreamer.checkpoint import load_checkpoint, save_checkpoint
from torchrl_dreamer.guards import NonFiniteError, check_metrics_finite, check_parameters_finite

from helpers import DREAMER_TINY, PPO_ROUTING_TSP_RUN


def test_message_names_the_checkpoint_only_when_one_exists(tmp_path):
    none_yet = NonFiniteError("loss/actor", iteration=3, run_dir=str(tmp_path))
    assert "no checkpoint was written yet" in str(none_yet) and "last good checkpoint" not in str(none_yet)
    save_checkpoint(tmp_path / "checkpoint.pt", {"a": 1})
    exists = NonFiniteError("loss/actor", iteration=3, run_dir=str(tmp_path))
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pt'}" in str(exists)
    assert f"--resume {tmp_path}" in str(exists)


def test_parameters_after_an_infinite_learning_rate_step_are_caught():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=float("inf"))
    net(torch.ones(1, 3)).sum().backward()
    check_parameters_finite(net.parameters())  # before the step: fine
    opt.step()
    with pytest.raises(NonFiniteError, match="'parameters'.*after the optimizer step.*check the learning rates"):
        check_parameters_finite(net.parameters())


def test_nan_evaluation_is_an_error():
    check_metrics_finite({"eval/gap_pct": 3.0}, ("eval/gap_pct", "eval/absent"))
    with pytest.raises(NonFiniteError, match="'eval/gap_pct'.*evaluation gave nan"):
        check_metrics_finite({"eval/gap_pct": math.nan}, ("eval/gap_pct",))


@pytest.mark.smoke
def test_nan_before_the_first_checkpoint_does_not_claim_one(tmp_runs):
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "env.factory=scripted_env:make_counting_env",
            "env.kwargs={nan_obs_at_call: 40}", "eval.every=0", "run.checkpoint_every=10000", "train.env_steps=200"]
    with pytest.raises(NonFiniteError, match="no checkpoint was written yet"):
        dreamer.main(args)
    assert not list(tmp_runs.rglob("checkpoint.pt"))


@pytest.mark.smoke
def test_infinite_learning_rate_never_reaches_a_checkpoint(tmp_runs, monkeypatch):
    run_dir = ppo_routing.main([*PPO_ROUTING_TSP_RUN, f"run.root={tmp_runs}"])
    good = (run_dir / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(ppo_routing, "lr_factor", lambda *a, **k: float("inf"))
    with pytest.raises(NonFiniteError, match="after the optimizer step.*last good checkpoint is"):
        ppo_routing.main(["--resume", str(run_dir), "train.iterations=3", "run.checkpoint_every=1"])
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    state = load_checkpoint(run_dir)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.smoke
def test_nan_evaluation_never_becomes_best_pt(tmp_runs, monkeypatch):
    monkeypatch.setattr(dreamer, "evaluate", lambda *a, **k: {"eval/episode_reward_sum": math.nan,
                                                              "eval/episode_length": 10.0, "eval/episodes": 0.0})
    with pytest.raises(NonFiniteError, match="'eval/episode_reward_sum'.*no checkpoint or best.pt was written"):
        dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "eval.every=48", "train.env_steps=96"])
    assert not list(tmp_runs.rglob("best.pt"))
