"""Smoke runs of the Dreamer recipe (every env YAML), resume, NaN guard, evaluate, config errors."""
import json
from pathlib import Path

import pytest
import torch

from recipes import dreamer
from torchrl_dreamer.checkpoint import load_checkpoint
from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.guards import NonFiniteError

from helpers import BENCHMARKS, DREAMER_TINY, REPO, last_json, read_metrics


def benchmark_module(monkeypatch, name: str):
    """A fresh import of ``benchmarks/<name>.py`` (benchmarks/ on sys.path for this test only)."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.smoke
@pytest.mark.parametrize("env_name", ["cartpole", "cartpole_pixels", "lunarlander", "pendulum"])
def test_smoke_every_env_yaml(env_name, tmp_runs, device_args):
    run_dir = dreamer.main(["--env", env_name, *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=96",
                            "eval.every=64", "env.max_episode_steps=30", *device_args])
    records = read_metrics(run_dir)
    last = records[-1]
    assert last["train/env_steps"] >= 96 and last["train/updates"] > 0
    assert "eval/episode_reward_sum" in last and "loss/world_model" in last
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "curves.png").is_file()
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.smoke
@pytest.mark.slow
def test_full_compile_mode_trains_and_logs(tmp_runs, monkeypatch):
    """model.compile=true model.compile_mode=full: compiled scan, imagination loop and losses run
    inside the recipe (prefill, updates, evaluation, checkpoint) and give finite losses; on CPU the
    graphs are built with inductor's C++ wrapper when model.compile_cpp_wrapper=true (the default;
    the CartPole YAML turns it off)."""
    asked = []
    real = dreamer.inductor_options
    monkeypatch.setattr(dreamer, "inductor_options", lambda *a: asked.append(a) or real(*a))
    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=64",
                            "eval.every=0", "env.max_episode_steps=30", "model.compile=true",
                            "model.compile_mode=full", "model.compile_cpp_wrapper=true"])
    assert asked == [("cpu", True)]
    last = read_metrics(run_dir)[-1]
    assert last["train/updates"] > 0
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("loss/world_model", "loss/critic", "loss/actor"))
    assert load_checkpoint(run_dir)["updates"] == last["train/updates"]


@pytest.mark.smoke
def test_compile_falls_back_to_eager_with_a_warning_when_unavailable(tmp_runs, monkeypatch, capsys):
    """The CartPole YAML asks for torch.compile; where it cannot run (no C++ compiler) the recipe
    says so and trains eagerly instead of failing at the first update."""
    calls = []
    monkeypatch.setattr(dreamer, "compile_unavailable",
                        lambda device: calls.append(device) or "InvalidCxxCompiler: no working C++ compiler")
    monkeypatch.setattr(dreamer.ImaginationModule, "enable_compile",
                        lambda self, *a, **k: pytest.fail("compiled although compile is unavailable"))
    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=48",
                            "eval.every=0", "env.max_episode_steps=30", "model.compile=true",
                            "model.compile_mode=full"])
    assert calls == ["cpu"]
    assert "training eagerly" in capsys.readouterr().err
    assert read_metrics(run_dir)[-1]["train/updates"] > 0


def test_compile_unavailable_reports_a_failing_compile(monkeypatch):
    """The check itself: None where torch.compile works, the error's name and first line where the
    compile raises (simulated; this machine has a C++ compiler)."""
    from torchrl_dreamer import cpu
    assert cpu.compile_unavailable() is None

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return run
    monkeypatch.setattr(cpu.torch, "compile", broken)
    assert cpu.compile_unavailable() == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"


def test_inductor_options_ask_for_the_cpp_wrapper_on_cpu_only():
    from torchrl_dreamer.cpu import inductor_options
    assert inductor_options("cpu") == {"options": {"cpp_wrapper": True}}
    assert inductor_options(torch.device("cpu"), cpp_wrapper=False) == {}
    assert inductor_options("cuda") == {} and inductor_options("cuda:1") == {}


def test_cartpole_yaml_defaults_to_the_compiled_update():
    from torchrl_dreamer.config import load_config
    cfg = load_config(dreamer.DreamerConfig, [dreamer.CONFIG_DIR / "base.yaml", dreamer.CONFIG_DIR / "cartpole.yaml"])
    assert cfg.model.compile is True and cfg.model.compile_mode == "full" and cfg.threads == 1
    # a 15-minute run: the C++ wrapper's longer cold compile costs more than its faster updates save
    assert cfg.model.compile_cpp_wrapper is False
    assert load_config(dreamer.DreamerConfig, [dreamer.CONFIG_DIR / "base.yaml"]).model.compile_cpp_wrapper is True


@pytest.mark.smoke
def test_custom_factory_env_and_terminal_rows(tmp_runs):
    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=64",
                            "env.factory=scripted_env:make_counting_env", "eval.every=0"])
    state = load_checkpoint(run_dir)
    storage = state["replay"]["_storage"]["_storage"]
    n = int(state["replay"]["_storage"]["_len"]) if "_len" in state["replay"]["_storage"] else None
    is_last = storage["is_last"][:n] if n else storage["is_last"]
    obs = storage["observation"][:n] if n else storage["observation"]
    # every episode of the counting env ends at t = 8: the final row is stored with its observation
    assert is_last.any()
    assert torch.allclose(obs[is_last][:, 0], torch.ones(int(is_last.sum())))
    assert storage["is_terminal"][is_last.nonzero().squeeze(-1)].all()
    assert read_metrics(run_dir)[-1]["train/episode_reward_sum"] == 8.0


@pytest.mark.smoke
def test_resume_continues_counters_parameters_and_replay(tmp_runs, device_args):
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "env.factory=scripted_env:make_counting_env",
            "eval.every=0", "run.checkpoint_every=64", *device_args]
    run_dir = dreamer.main([*args, "train.env_steps=64"])
    first = load_checkpoint(run_dir)
    assert first["env_steps"] == 64 and first["updates"] > 0
    dreamer.main(["--resume", str(run_dir), "train.env_steps=128"])
    second = load_checkpoint(run_dir)
    assert second["env_steps"] == 128 and second["updates"] > first["updates"]
    # parameters continued from the checkpoint (not re-initialised): the optimizer step count grew
    steps = [g["step"] for g in second["optimizer"]["param_groups"]]
    assert all(s == second["updates"] for s in steps)
    assert second["replay"]["_storage"]["_storage"]["observation"].shape[0] >= 128
    # streams after the resume are new ones: no replay window joins the old and new episodes
    streams = second["replay"]["_storage"]["_storage"]["stream"]
    assert int(streams.max()) >= 2
    records = read_metrics(run_dir)
    assert records[-1]["train/env_steps"] == 128
    # the training clock (time/total_s, run.time_budget_s) goes on from the checkpoint's seconds
    assert 0 < first["elapsed_s"] <= second["elapsed_s"]
    assert all(r["time/total_s"] >= first["elapsed_s"] for r in records if r["train/env_steps"] > 64)


@pytest.mark.smoke
def test_cosine_schedule_lowers_every_learning_rate_to_the_final_fraction(tmp_runs):
    """``optim.lr_schedule=cosine``: the rates are held until ``optim.lr_decay_start`` of the run (in env
    steps), then follow the multiplier (logged as ``train/lr_multiplier``) down towards
    ``optim.lr_final_fraction``; the optimizer's groups carry the scaled rates. ``constant`` logs 1."""
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "env.factory=scripted_env:make_counting_env",
            "eval.every=0", "train.env_steps=160", "optim.world_model_lr=2e-4", "optim.actor_lr=1e-4",
            "optim.critic_lr=3e-4"]
    run_dir = dreamer.main([*args, "optim.lr_schedule=cosine", "optim.lr_decay_start=0.5", "optim.lr_final_fraction=0.1"])
    rows = [(r["train/env_steps"], r["train/lr_multiplier"]) for r in read_metrics(run_dir)]
    held = [m for steps, m in rows if steps <= 80]
    decayed = [m for steps, m in rows if steps > 96]
    assert held and all(m == pytest.approx(1.0) for m in held)
    assert decayed and all(0.1 <= m < 1.0 for m in decayed) and decayed == sorted(decayed, reverse=True)
    groups = {g["name"]: g["lr"] for g in load_checkpoint(run_dir)["optimizer"]["param_groups"]}
    last = rows[-1][1]
    assert groups == pytest.approx({"world_model": 2e-4 * last, "actor": 1e-4 * last, "critic": 3e-4 * last})
    run_dir = dreamer.main(args)
    assert {r["train/lr_multiplier"] for r in read_metrics(run_dir)} == {1.0}
    groups = {g["name"]: g["lr"] for g in load_checkpoint(run_dir)["optimizer"]["param_groups"]}
    assert groups == pytest.approx({"world_model": 2e-4, "actor": 1e-4, "critic": 3e-4})


@pytest.mark.smoke
def test_resume_restores_exact_parameters(tmp_runs):
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "env.factory=scripted_env:make_counting_env",
            "eval.every=0", "train.env_steps=48"]
    run_dir = dreamer.main(args)
    saved = load_checkpoint(run_dir)
    # resume for 32 more env steps with a train ratio too small to owe an update: whatever the
    # resumed run holds must be exactly what was saved
    dreamer.main(["--resume", str(run_dir), "train.env_steps=80", "replay.train_ratio=0.001"])
    again = load_checkpoint(run_dir)
    assert again["env_steps"] == 80 and again["updates"] == saved["updates"]
    for name, value in saved["agent"].items():
        assert torch.equal(value, again["agent"][name]), name
    assert str(again["optimizer"]["state"]) == str(saved["optimizer"]["state"])


@pytest.mark.smoke
def test_nan_observation_stops_with_message_and_keeps_checkpoint(tmp_runs):
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "env.factory=scripted_env:make_counting_env",
            "env.kwargs={nan_obs_at_call: 40}", "eval.every=0", "run.checkpoint_every=16", "train.env_steps=200"]
    with pytest.raises(NonFiniteError, match="non-finite values in 'next/observation'.*last good checkpoint") as info:
        dreamer.main(args)
    run_dir = info.value.run_dir
    state = load_checkpoint(run_dir)
    assert state["env_steps"] < 96  # written before the NaN batch, untouched by it
    assert all(torch.isfinite(v).all() for v in state["agent"].values() if v.is_floating_point())


@pytest.mark.smoke
def test_evaluate_entry_point(tmp_runs, capsys):
    """``--evaluate`` plays ``eval.episodes`` CartPole episodes (one per env, mode actions) from the
    checkpoint: CartPole pays +1 per step, so the mean episode reward sum is the mean episode length;
    the record names the checkpoint's counters, is saved as printed, and a second evaluation of the
    same checkpoint and seed repeats it."""
    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=48", "eval.every=0"])
    state = load_checkpoint(run_dir)
    capsys.readouterr()
    torch.manual_seed(0)  # the posterior samples come from the caller's RNG (see the next test)
    dreamer.main(["--evaluate", str(run_dir), "eval.episodes=2"])
    out = last_json(capsys.readouterr().out)
    assert json.loads((run_dir / "eval.json").read_text()) == out
    assert out["eval/episodes"] == 2 and out["checkpoint"] == str(run_dir / "checkpoint.pt")
    assert out["env_steps"] == state["env_steps"] == 48 and out["updates"] == state["updates"]
    assert out["eval/episode_reward_sum"] == out["eval/episode_length"]  # +1 per step, the last one included
    assert 1 <= out["eval/episode_length"] <= 500  # CartPole-v1 truncates at 500 steps
    torch.manual_seed(0)
    dreamer.main(["--evaluate", str(run_dir), "eval.episodes=2"])
    again = last_json(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if not k.startswith("time/")} == \
        {k: v for k, v in out.items() if not k.startswith("time/")}


@pytest.mark.smoke
def test_evaluate_does_not_depend_on_the_callers_random_state(tmp_runs, capsys):
    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=48", "eval.every=0"])
    results = []
    for caller_seed in (1, 2, 3):
        torch.manual_seed(caller_seed)
        capsys.readouterr()
        dreamer.main(["--evaluate", str(run_dir), "eval.episodes=4"])
        out = last_json(capsys.readouterr().out)
        results.append((out["eval/episode_reward_sum"], out["eval/episode_length"]))
    assert results[0] == results[1] == results[2]


@pytest.mark.smoke
@pytest.mark.slow
def test_run_ends_by_rescoring_final_and_best_weights_and_naming_the_better(tmp_runs, capsys, monkeypatch):
    """eval.confirm_episodes: after the last step the final weights and best.pt are each scored on the
    same fresh episodes; result.json holds both scores and names the better file, the run's own
    weights are left as they were trained, and a run that fails writes no result.json."""
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "eval.every=32", "env.max_episode_steps=30",
                "train.env_steps=96", "eval.confirm_episodes=3"]
    scored = []
    real = dreamer.evaluate

    def spy(policy, env, **kw):
        out = real(policy, env, **kw)
        scored.append((env.batch_size.numel(), next(policy.parameters()).detach().clone(), out))
        return out

    monkeypatch.setattr(dreamer, "evaluate", spy)
    run_dir = dreamer.main(args)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["episodes"] == 3 and result["final"]["file"] == "checkpoint.pt" and result["best"]["file"] == "best.pt"
    best = load_checkpoint(run_dir / "best.pt")
    assert result["best"]["env_steps"] == best["env_steps"]
    assert result["best"]["eval_when_saved"] == best["eval/episode_reward_sum"]
    confirm = [s for s in scored if s[0] == 3]  # the periodic evaluations use eval.episodes=2 envs
    assert len(confirm) == 2
    final_out, best_out = confirm[0][2], confirm[1][2]
    assert result["final"]["episode_reward_sum"] == final_out["eval/episode_reward_sum"]
    assert result["best"]["episode_reward_sum"] == best_out["eval/episode_reward_sum"]
    better = "best.pt" if best_out["eval/episode_reward_sum"] > final_out["eval/episode_reward_sum"] else "checkpoint.pt"
    assert result["use"] == better
    assert f"-> use {run_dir / better}" in capsys.readouterr().out
    # the first call scored the final checkpoint's weights, the second best.pt's
    assert any(torch.equal(confirm[0][1], v) for v in load_checkpoint(run_dir)["agent"].values())
    assert any(torch.equal(confirm[1][1], v) for v in best["agent"].values())
    # a failing run writes no result.json
    def boom(*a, **k):
        raise RuntimeError("update failed")
    monkeypatch.setattr(dreamer, "run_owed_updates", boom)
    with pytest.raises(RuntimeError, match="update failed"):
        dreamer.main([*args, f"run.root={tmp_runs}/failing", "replay.prefill=16"])
    assert not list((Path(tmp_runs) / "failing").rglob("result.json"))


def test_best_checkpoint_holds_the_best_evaluation_across_a_resume(tmp_runs, capsys):
    """eval.keep_best: <run>/best.pt holds the weights of the best evaluation so far (not the last),
    ``eval/best_episode_reward_sum`` is the running maximum, a resume carries it on (a worse
    evaluation after the resume does not replace best.pt), and ``--evaluate <run>/best.pt`` scores
    that file with the run's config."""
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "eval.every=32", "env.max_episode_steps=30"]
    run_dir = dreamer.main([*args, "train.env_steps=96"])
    dreamer.main(["--resume", str(run_dir), "train.env_steps=192"])
    evals = [r for r in read_metrics(run_dir) if "eval/episode_reward_sum" in r]
    assert len(evals) >= 5
    scores = [r["eval/episode_reward_sum"] for r in evals]
    assert [r["eval/best_episode_reward_sum"] for r in evals] == [max(scores[:i + 1]) for i in range(len(scores))]
    best = load_checkpoint(run_dir / "best.pt")
    first_best = next(r for r in evals if r["eval/episode_reward_sum"] == max(scores))
    assert best["eval/episode_reward_sum"] == max(scores) and best["env_steps"] == first_best["train/env_steps"]
    assert load_checkpoint(run_dir)["best_return"] == max(scores)
    capsys.readouterr()
    dreamer.main(["--evaluate", str(run_dir / "best.pt"), "eval.episodes=2"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["env_steps"] == best["env_steps"] and out["eval/episodes"] == 2
    with pytest.raises(ConfigError, match="does not exist"):
        dreamer.main(["--evaluate", str(run_dir / "missing.pt")])
    # a run that died after writing best.pt but before its next checkpoint: the resume takes the
    # best score from best.pt, so a worse evaluation later does not replace it
    state = load_checkpoint(run_dir)
    state["best_return"] = -1.0
    torch.save(state, run_dir / "checkpoint.pt")
    dreamer.main(["--resume", str(run_dir), "train.env_steps=224"])
    assert load_checkpoint(run_dir / "best.pt")["env_steps"] == best["env_steps"]
    assert read_metrics(run_dir)[-1]["eval/best_episode_reward_sum"] >= max(scores)


@pytest.mark.parametrize("override, message", [
    ("model.size=huge", "model.size must be one of"),
    ("env.name=NoSuchEnv-v0", "unknown Gymnasium env id"),
    ("ac.start_fraction=0", "ac.start_fraction"),
    ("model.compile_mode=graph", "model.compile_mode must be one of"),
    ("replay.learning_rate=1", "unknown config key 'replay.learning_rate'"),
    ("replay.batch_size=abc", "wrong type"),
    ("optim.lr_schedule=linear", "optim.lr_schedule must be one of"),
    ("optim.lr_decay_start=1.0", "optim.lr_decay_start"),
    ("optim.lr_final_fraction=0", "optim.lr_final_fraction"),
])
def test_config_errors_before_any_work(override, message, tmp_runs):
    with pytest.raises(ConfigError, match=message):
        dreamer.main(["--env", "cartpole", f"run.root={tmp_runs}", override])
    assert not tmp_runs.exists()


@pytest.mark.smoke
def test_cartpole_episode_ends_diagnostic_reads_a_checkpoint(tmp_runs, monkeypatch, capsys):
    """benchmarks/dreamer_cartpole_episode_ends.py: plays mode-action episodes from a run's checkpoint
    and names why each ended; the ends it reports agree with the episode lengths it prints."""

    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=64", "eval.every=0"])
    diag = benchmark_module(monkeypatch, "dreamer_cartpole_episode_ends")
    out = diag.main([str(run_dir), "--episodes", "3", "--max-steps", "40", "--last", "2"])
    assert out["env_steps"] == 64
    assert sum(out["ends"].values()) == 3 and set(out["ends"]) <= {"x-out", "angle-out", "truncated"}
    text = capsys.readouterr().out
    assert text.count("episode ") == 3 and "continue" in text and "decoder mean absolute error" in text
    assert all(len(v) == 4 for v in out["decoder_error_by_abs_x"].values())
    # an untrained policy on CartPole fails by the pole angle within 40 steps, never by truncation
    assert out["ends"].get("angle-out", 0) + out["ends"].get("x-out", 0) >= 1
    with pytest.raises(SystemExit, match="no config.yaml"):
        diag.main([str(run_dir.parent / "missing")])


@pytest.mark.smoke
def test_lunarlander_episode_ends_diagnostic_reads_a_checkpoint(tmp_runs, monkeypatch, capsys):
    """benchmarks/dreamer_lunarlander_episode_ends.py end to end on a tiny LunarLander run: every
    episode is sorted into one kind of ending, and each kind carries the heads' figures, the ground
    table and the reward before the end."""

    pytest.importorskip("Box2D")
    run_dir = dreamer.main(["--env", "lunarlander", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=64",
                            "eval.every=0"])
    diag = benchmark_module(monkeypatch, "dreamer_lunarlander_episode_ends")
    out = diag.main([str(run_dir), "--episodes", "3", "--max-steps", "30", "--out", str(tmp_runs / "ends")])
    assert out["env_steps"] == 64
    assert sum(v["episodes"] for v in out["summary"].values()) == 3
    assert set(out["summary"]) <= {"landed", "crashed", "truncated", "other"}
    for s in out["summary"].values():
        assert {"continue_final", "ground_steps", "reward_before_end", "predicted_reward_before_end"} <= set(s)
    text = capsys.readouterr().out
    assert "On the ground" in text and "Reward over the 100 steps before the final row" in text
    assert (tmp_runs / "ends.json").is_file()


def test_lunarlander_episode_ends_counts_engine_use_on_the_ground(monkeypatch):
    """benchmarks/dreamer_lunarlander_episode_ends.py's ground table: the rows after which both leg
    contacts are set, the share of the actions taken from them that fire an engine, and the actor's
    probabilities there (a distribution); an episode that never touches down gives NaN, not a crash."""
    import math

    import torch.nn.functional as F

    from torchrl_dreamer.dreamer import make_agent, preset

    diag = benchmark_module(monkeypatch, "dreamer_lunarlander_episode_ends")
    torch.manual_seed(0)
    agent = make_agent({"observation": (8,)}, 4, True, preset("nano"))
    L = 10
    obs = torch.randn(L + 1, 8)
    obs[:, 6:] = 0.0
    obs[6:, 6:] = 1.0  # both legs down in the observations after steps 5..9 (obs rows 6..10)
    actions = torch.tensor([2, 2, 2, 2, 2, 0, 1, 0, 3, 0])  # from rows 6..9: left, none, right, none
    feat = diag.inspect(agent, obs, F.one_hot(actions, 4).float())["feat"]
    assert feat.shape[0] == L + 1
    out = diag.on_ground(agent, feat, obs, F.one_hot(actions, 4).float())
    assert out["ground_steps"] == 5.0
    assert out["ground_engine_share"] == 0.5
    probs = [out[f"ground_prob_{a}"] for a in diag.ACTIONS]
    assert all(0.0 <= p <= 1.0 for p in probs) and abs(sum(probs) - 1.0) < 1e-5
    with torch.no_grad():  # read at the observations after the ground steps (rows 6..10), not at rows 5..9
        expected = agent.actor(feat[6:11]).probs.mean(0)
    assert probs == pytest.approx(expected.tolist(), abs=1e-6)
    obs[:, 6:] = 0.0  # never on the ground
    out = diag.on_ground(agent, feat, obs, F.one_hot(actions, 4).float())
    assert out["ground_steps"] == 0.0 and math.isnan(out["ground_engine_share"]) and math.isnan(out["ground_prob_none"])


def test_update_ab_harness_builds_package_copies_and_prints_ratios(tmp_path, monkeypatch, capsys):
    """benchmarks/dreamer_update_ab.py (eager, tiny round counts): 'cur' is the installed package,
    another name a copy under --pkgs, which is really imported; a missing copy is a clear error."""
    import importlib
    import shutil
    import sys

    root = REPO
    shutil.copytree(root / "torchrl_dreamer", tmp_path / "torchrl_dreamer_x", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    sys.modules.pop("dreamer_update_ab", None)
    ab = importlib.import_module("dreamer_update_ab")
    monkeypatch.setattr(ab, "tune_malloc", lambda: False)
    common = ["dreamer_update_ab.py", "--pkgs", str(tmp_path), "--eager", "--rounds", "2", "--per-round", "1", "--warmup", "1"]
    try:
        monkeypatch.setattr(sys, "argv", [*common, "cur", "x"])
        ab.main()
        out = capsys.readouterr().out
        assert "torchrl_dreamer_x.dreamer.update" in sys.modules
        assert "cur: median" in out and "x: median" in out
        assert "ratio x / cur: median" in out and "2 rounds" in out
        monkeypatch.setattr(sys, "argv", [*common, "cur", "missing"])
        with pytest.raises(SystemExit, match="no package copy torchrl_dreamer_missing"):
            ab.main()
    finally:
        for name in [m for m in sys.modules if m.startswith("torchrl_dreamer_x")]:
            del sys.modules[name]


def test_throughput_benchmark_runs_both_sides_under_one_allocator_setting(tmp_path, monkeypatch, capsys):
    """benchmarks/dreamer_throughput.py at toy sizes (eager): both updates run, the ratio, the phase
    breakdown and each side's page faults per update are stored, and the allocator setting (the
    recipes' tune_malloc unless --default-malloc) is recorded."""
    import sys

    bench = benchmark_module(monkeypatch, "dreamer_throughput")
    tuned = []
    monkeypatch.setattr(bench, "tune_malloc", lambda: tuned.append(True) or True)
    for flags, expect_tuned in (([], True), (["--default-malloc"], False)):
        out = tmp_path / f"tp{len(flags)}.json"
        monkeypatch.setattr(sys, "argv", ["dreamer_throughput.py", "--rounds", "2", "--per-round", "1", "--warmup", "1",
                                          "--batch", "2", "--seq-len", "4", "--horizon", "2", "--out", str(out), *flags])
        bench.main()
        result = json.loads(out.read_text())
        assert result["malloc_tuned"] is expect_tuned and len(tuned) == 1
        assert result["ours_updates_per_s"] > 0 and result["torchrl_updates_per_s"] > 0
        ratios = [r["ours"] / r["torchrl"] for r in result["rounds"]]
        assert result["ratio_median"] == pytest.approx(sum(ratios) / 2)  # the median of the two rounds' ratios
        assert set(result["ours_phase_s"]) == {"world_model", "imagination", "actor_critic"}
        assert all(r["ours_faults_per_update"] >= 0 and r["torchrl_faults_per_update"] >= 0 for r in result["rounds"])
    assert "allocator: glibc defaults" in capsys.readouterr().out


def test_throughput_benchmark_ours_only_with_recipe_starts_and_profile(tmp_path, monkeypatch, capsys):
    """dreamer_throughput.py --ours-only with the recipe's start fraction, no replay-value loss and
    LunarLander's observation / action sizes runs, prints the profiler's matrix-multiply share and writes
    its JSON (the sizes and the share included); a start fraction for TorchRL's side is refused."""
    import sys

    bench = benchmark_module(monkeypatch, "dreamer_throughput")
    monkeypatch.setattr(bench, "tune_malloc", lambda: False)
    common = ["dreamer_throughput.py", "--rounds", "1", "--per-round", "1", "--warmup", "1", "--batch", "2",
              "--seq-len", "4", "--horizon", "2", "--start-fraction", "0.5"]
    out_file = tmp_path / "ours.json"
    monkeypatch.setattr(sys, "argv", [*common, "--ours-only", "--replay-value", "0", "--profile", "1",
                                      "--obs-dim", "8", "--action-dim", "4", "--out", str(out_file)])
    bench.main()
    out = capsys.readouterr().out
    assert "ours: " in out and "matrix multiplies (aten::mm, addmm, bmm): " in out
    result = json.loads(out_file.read_text())
    assert (result["obs_dim"], result["action_dim"], result["ours_only"]) == (8, 4, True)
    assert result["ours_updates_per_s"] > 0 and "torchrl_updates_per_s" not in result
    assert 0 < result["matmul_share"] < 1 and result["start_fraction"] == 0.5 and result["replay_value"] == 0
    # the sizes reach the model: CartPole's default 4 floats / 2 actions give fewer parameters
    cartpole_file = tmp_path / "cartpole.json"
    monkeypatch.setattr(sys, "argv", [*common, "--ours-only", "--out", str(cartpole_file)])
    bench.main()
    cartpole = json.loads(cartpole_file.read_text())["ours_params"]
    assert all(cartpole[k] < result["ours_params"][k] for k in ("world_model", "actor"))
    monkeypatch.setattr(sys, "argv", common)
    with pytest.raises(SystemExit):
        bench.main()
    assert "--start-fraction is ours-only" in capsys.readouterr().err


def test_value_check_discounted_tail_and_rows(monkeypatch):
    """benchmarks/dreamer_value_check.py: the return that followed each row is the discounted reward sum
    (bootstrapped with the critic's value at the last row only for a truncated episode), the real reward
    over the horizon stops at the episode's end, and only rows whose episode runs past the horizon report
    the critic's value there."""
    import math

    import torch.nn.functional as F

    from torchrl_dreamer.dreamer import make_agent, preset

    vc = benchmark_module(monkeypatch, "dreamer_value_check")
    tail = vc.discounted_tail(torch.tensor([1.0, 2.0, 3.0]), 0.5, bootstrap=8.0)
    assert tail.tolist() == [1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 8, 2 + 0.5 * 3 + 0.25 * 8, 3 + 0.5 * 8, 8.0]

    torch.manual_seed(0)
    agent = make_agent({"observation": (8,)}, 4, True, preset("nano"))
    with torch.no_grad():  # the critic's output layer starts at zero (value 0 everywhere): give it values
        for p in agent.critic.parameters():
            p.normal_(0.0, 0.3)
    L, H, gamma = 12, 5, 0.9
    obs, rew = torch.randn(L + 1, 8), torch.arange(1.0, L + 1)
    act = F.one_hot(torch.randint(0, 4, (L,)), 4).float()
    common = dict(gamma=gamma, horizon=H, samples=2, every=3, scale=1.0, cont_mode="prob")
    ended = vc.check_episode(agent, obs, act, rew, truncated=False, **common)
    cut = vc.check_episode(agent, obs, act, rew, truncated=True, **common)
    assert [r["t"] for r in ended] == [0, 3, 6, 9]
    for r in ended:
        t = r["t"]
        assert r["return"] == pytest.approx(sum(gamma ** k * float(rew[t + k]) for k in range(L - t)))
        assert r["real_reward"] == pytest.approx(sum(gamma ** k * float(rew[t + k]) for k in range(min(H, L - t))))
        assert r["real_alive"] == float(t + H < L)
        assert math.isnan(r["real_end_value"]) == (t + H >= L) == math.isnan(r["open_loop_end_value"])
        assert math.isfinite(r["imagined_reward"]) and 0.0 <= r["imagined_alive"] <= 1.0
    # truncated: the same rewards plus gamma^(L - t) times one value, the critic's at the last row
    boot = [(b["return"] - a["return"]) / gamma ** (L - a["t"]) for a, b in zip(ended, cut)]
    assert max(boot) - min(boot) < 1e-6 * (1 + abs(boot[0])) and abs(boot[0]) > 1e-3
    # a row exactly the horizon before the end: a terminated episode has stopped there, a truncated one not
    common["every"] = 1
    ended = vc.check_episode(agent, obs, act, rew, truncated=False, **common)
    cut = vc.check_episode(agent, obs, act, rew, truncated=True, **common)
    assert ended[L - H]["real_alive"] == 0.0 and math.isnan(ended[L - H]["real_end_value"])
    assert cut[L - H]["real_alive"] == 1.0 and math.isfinite(cut[L - H]["real_end_value"])
    assert ended[L - H - 1]["real_alive"] == cut[L - H - 1]["real_alive"] == 1.0
    # --from: only the rows from that step on; an episode that ends before it gives none
    late = vc.check_episode(agent, obs, act, rew, truncated=False, **{**common, "every": 3}, start=7)
    assert [r["t"] for r in late] == [7, 10]
    assert vc.check_episode(agent, obs, act, rew, truncated=False, **common, start=L) == []
    assert vc.check_episode(agent, obs, act, rew, truncated=False, **common, start=L + 5) == []


@pytest.mark.smoke
@pytest.mark.parametrize("extra", [[], ["env.time_feature=true"]], ids=["plain", "time_feature"])
def test_value_check_reads_a_lunarlander_checkpoint(extra, tmp_runs, monkeypatch, capsys):
    """benchmarks/dreamer_value_check.py end to end on a tiny LunarLander run: rows grouped by how their
    episode ended and whether the legs touch, every group with the critic's, imagination's and the env's
    figures, and the JSON written; also for a run whose observation carries the time feature."""

    pytest.importorskip("Box2D")
    run_dir = dreamer.main(["--env", "lunarlander", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=64",
                            "eval.every=0", *extra])
    vc = benchmark_module(monkeypatch, "dreamer_value_check")
    out = vc.main([str(run_dir), "--episodes", "3", "--max-steps", "30", "--every", "5", "--samples", "2",
                   "--out", str(tmp_runs / "value")])
    assert out["env_steps"] == 64 and out["actions"] == "sample"
    assert sum(len(e["rows"]) for e in out["per_episode_rows"]) == sum(s["rows"] for s in out["summary"].values())
    for group, s in out["summary"].items():
        end, legs = group.split(", ")
        assert end in {"landed", "crashed", "truncated", "other"} and legs in {"air", "ground"}
        assert {"value", "return", "imagined_reward", "real_reward", "imagined_alive", "open_loop_end_value"} <= set(s)
    assert "critic value after it" in capsys.readouterr().out
    assert (tmp_runs / "value.json").is_file()
    with pytest.raises(SystemExit):
        vc.main([str(run_dir), "--every", "0"])


@pytest.mark.smoke
def test_ablation_scores_kept_files_with_the_recipe(tmp_runs, monkeypatch):
    """``dreamer_ablation.py --keep-at``: the kept checkpoint and ``best.pt`` are scored by the recipe's own
    ``--evaluate`` on fresh episodes, and the score carries the checkpoint's env steps."""

    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "train.env_steps=64",
                            "eval.every=32"])
    ablation = benchmark_module(monkeypatch, "dreamer_ablation")
    dest = ablation.keep(run_dir, 30)
    scored = ablation.score_kept("cartpole", dest, episodes=2, threads=1)
    assert scored["env_steps"] == 64 and scored["dir"] == str(dest)
    assert 1.0 <= scored["checkpoint"] <= 500.0 and 1.0 <= scored["best"] <= 500.0
    assert (dest / "eval.json").is_file() and (dest / "eval_best.json").is_file()
