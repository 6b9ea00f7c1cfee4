"""Smoke runs of the MAPPO recipe for every scenario YAML, custom envs, resume and guards."""
import json
from pathlib import Path

import pytest
import torch

from recipes.mappo_vmas import CONFIG_DIR, main
from torchrl_dreamer.checkpoint import load_checkpoint, save_checkpoint
from torchrl_dreamer.guards import NonFiniteError

from helpers import MAPPO_TINY, mappo_tiny, read_metrics


@pytest.mark.smoke
@pytest.mark.parametrize("scenario", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base"))
def test_smoke_every_scenario_yaml(scenario, tmp_runs, device_args):
    run_dir = main(["--env", scenario, *mappo_tiny(), f"run.root={tmp_runs}", *device_args])
    expected_env = "envs.goal_reaching.make_env" if scenario == "custom" else scenario
    assert run_dir.parent.name == expected_env and run_dir.parent.parent.name == "mappo_vmas"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert (run_dir / "curves.png").stat().st_size > 1000
    records = read_metrics(run_dir)
    assert [r["train/iteration"] for r in records] == [1, 2]
    last = records[-1]
    for key in ("train/episode_reward_sum", "train/step_reward_mean", "eval/episode_reward_sum",
                "loss/objective", "loss/critic", "time/iteration_s", "diag/grad_norm"):
        assert key in last, key
    assert all(k == "step" or k == "wall_time" or k.split("/")[0] in {"train", "eval", "loss", "time", "diag"}
               for k in last)


@pytest.mark.smoke
def test_tensorboard_events_written(tmp_runs):
    run_dir = main(["--env", "navigation", *mappo_tiny(), "run.tensorboard=true", f"run.root={tmp_runs}"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.smoke
def test_ippo_torchrl_impl_and_separate_params(tmp_runs):
    run_dir = main(["--env", "navigation", *mappo_tiny(), "model.centralised_critic=false",
                    "model.share_policy_params=false", "model.share_critic_params=false",
                    "ppo.impl=torchrl", f"run.root={tmp_runs}"])
    assert read_metrics(run_dir)[-1]["diag/optimizer_steps"] == 2


@pytest.mark.smoke
def test_compiled_update_runs(tmp_runs, monkeypatch):
    """ppo.compile=true: the recipe compiles the fused loss (Dynamo builds a graph of it), every
    minibatch step of ppo_update goes through the compiled function, and the iteration's losses
    equal an eager run's (same seed, same rollouts)."""
    from torch._dynamo.utils import counters

    import baselines.mappo as mappo

    compiled, calls = [], []
    enable_compile = mappo.MultiAgentPPOLoss.enable_compile

    def spy(loss):
        enable_compile(loss)
        compiled.append(loss)
        fn = loss._compiled_losses
        loss._compiled_losses = lambda *args: calls.append(len(args)) or fn(*args)

    monkeypatch.setattr(mappo.MultiAgentPPOLoss, "enable_compile", spy)
    graphs_before = counters["stats"]["unique_graphs"]
    args = ["--env", "navigation", *mappo_tiny(), "collector.iterations=1"]
    run_dir = main([*args, "ppo.compile=true", f"run.root={tmp_runs / 'compiled'}"])
    assert len(compiled) == 1 and compiled[0].losses_fn is not compiled[0].losses
    assert counters["stats"]["unique_graphs"] > graphs_before  # a graph was built (not an eager fallback)
    last = read_metrics(run_dir)[-1]
    assert len(calls) == last["diag/optimizer_steps"] == 2  # 1 epoch x 2 minibatches, all compiled
    eager = read_metrics(main([*args, "ppo.compile=false", f"run.root={tmp_runs / 'eager'}"]))[-1]
    assert len(compiled) == 1  # the eager run compiled nothing
    # (loss/entropy differs: its one-sample estimate draws other random numbers inside the graph)
    for key in ("loss/objective", "loss/critic", "diag/grad_norm"):
        assert last[key] == pytest.approx(eager[key], rel=1e-3), key


@pytest.mark.smoke
def test_custom_env_factory_trains(tmp_runs):
    args = ["--env", "custom", "env.factory=envs.goal_reaching:make_env", "env.kwargs.n_agents=2", "env.max_steps=20",
            "collector.frames_per_batch=640", "collector.iterations=6", "ppo.epochs=4", "ppo.minibatch_size=64",
            "ppo.lr=3e-3", "ppo.compile=false", "model.width=64", "eval.every=0", "run.progress=false",
            "run.tensorboard=false", f"run.root={tmp_runs}"]
    run_dir = main(args)
    assert run_dir.parent.name == "envs.goal_reaching.make_env"
    rewards = [r["train/episode_reward_sum"] for r in read_metrics(run_dir)]
    assert rewards[-1] > rewards[0] + 0.1, rewards


@pytest.mark.smoke
def test_checkpoint_resume_continues_with_identical_parameters(tmp_runs):
    run_dir = main(["--env", "navigation", *mappo_tiny(), "run.checkpoint_every=1", f"run.root={tmp_runs}"])
    saved = load_checkpoint(run_dir)
    assert saved["iteration"] == 2 and saved["frames"] == 40
    # resume to 3 iterations; capture the parameters the resumed run starts from
    import recipes.mappo_vmas as recipe

    started_with = {}
    original_update = recipe.update

    def spy(loss, batch, optimizer, cfg, **kw):
        if not started_with:
            started_with.update({k: v.clone() for k, v in loss.state_dict().items()})
            started_with["adam_steps"] = [s["step"].clone() for s in optimizer.state.values()]
        return original_update(loss, batch, optimizer, cfg, **kw)

    recipe.update = spy
    try:
        main(["--resume", str(run_dir), "collector.iterations=3"])
    finally:
        recipe.update = original_update
    for name, value in saved["policy"].items():
        assert torch.equal(started_with[f"policy.{name}"], value), name
    for name, value in saved["critic"].items():
        assert torch.equal(started_with[f"critic.{name}"], value), name
    # optimizer state restored: 2 iterations x 1 epoch x 2 minibatches = 4 Adam steps
    assert started_with["adam_steps"] and all(int(s) == 4 for s in started_with["adam_steps"])
    records = read_metrics(run_dir)
    assert [r["train/iteration"] for r in records] == [1, 2, 3]
    assert records[-1]["step"] == 60
    assert load_checkpoint(run_dir)["iteration"] == 3


@pytest.mark.smoke
def test_resume_errors(tmp_runs, tmp_path):
    with pytest.raises(Exception, match="config.yaml does not exist"):
        main(["--resume", str(tmp_path / "missing")])
    run_dir = main(["--env", "navigation", *mappo_tiny(), f"run.root={tmp_runs}"])
    with pytest.raises(Exception, match="nothing to do"):
        main(["--resume", str(run_dir)])
    # the time budget counts across resumes: one already spent is refused
    spent = load_checkpoint(run_dir)["elapsed_s"]
    assert spent > 0
    with pytest.raises(Exception, match="nothing to do: the run already trained"):
        main(["--resume", str(run_dir), "collector.iterations=5", f"run.time_budget_s={spent / 2}"])


@pytest.mark.smoke
def test_nan_observation_stops_with_message_and_keeps_last_checkpoint(tmp_runs):
    # observations turn NaN at the 15th env step: iteration 1 (steps 1-10) is fine and
    # checkpointed; iteration 2 must stop before any update.
    args = ["--env", "custom", "env.factory=scripted_env:make_nan_env", "env.kwargs={nan_obs_at_call: 15}", "env.max_steps=10", "collector.frames_per_batch=20",
            "ppo.minibatch_size=10", *MAPPO_TINY, "run.checkpoint_every=1", "eval.every=0", f"run.root={tmp_runs}"]
    with pytest.raises(NonFiniteError) as err:
        main(args)
    msg = str(err.value)
    assert "agents/observation" in msg and "iteration 2" in msg
    run_dir = Path(err.value.run_dir)
    assert run_dir.is_dir() and str(run_dir) in msg
    state = load_checkpoint(run_dir)
    assert state["iteration"] == 1
    for value in state["policy"].values():
        assert torch.isfinite(value).all()


def test_atomic_checkpoint_leaves_no_partial_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"a": torch.ones(3)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"a": torch.zeros(3), "bad": Unpicklable()})
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))  # old checkpoint intact
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no stray temp file


@pytest.mark.smoke
def test_time_budget_stops_after_the_iteration_that_spends_it(tmp_runs):
    run_dir = main(["--env", "navigation", *mappo_tiny(), "collector.iterations=5", "run.time_budget_s=0.001",
                    "run.checkpoint_every=100", "eval.every=100", f"run.root={tmp_runs}"])
    records = read_metrics(run_dir)
    assert [r["train/iteration"] for r in records] == [1]
    assert "eval/episode_reward_sum" in records[-1]  # final eval and checkpoint still happen
    assert load_checkpoint(run_dir)["iteration"] == 1


@pytest.mark.smoke
def test_evaluate_entry_point(tmp_runs, capsys):
    run_dir = main(["--env", "navigation", *mappo_tiny(), f"run.root={tmp_runs}"])
    capsys.readouterr()
    assert main(["--evaluate", str(run_dir), "eval.num_envs=3"]) == run_dir
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["iteration"] == 2 and printed["eval/episodes_finished"] == 3
    assert "eval/episode_reward_sum" in printed
    with pytest.raises(Exception, match="exclude each other"):
        main(["--evaluate", str(run_dir), "--resume", str(run_dir)])
