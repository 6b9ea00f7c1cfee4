"""``--evaluate`` loses nothing and is reproducible: numbers printed and saved (eval.json) before any
picture, a read-only run directory costs only the files, seeded Dreamer routing decoding that
leaves the training RNG alone, the same JSON keys for PPO and Dreamer routing, labelled curves."""
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import recipes.dreamer_routing as dreamer_routing
import torchrl_dreamer.evaluation as evaluation
import torchrl_dreamer.routing_eval as routing_eval
from torchrl_dreamer.routing_eval import ROUTING_EVAL_KEYS, RoutingEnvConfig
from envs.routing import generate_cvrp
from recipes import routing
from torchrl_dreamer.plots import learning_curves_figure, plot_learning_curves

from helpers import DREAMER_ROUTING_TINY, DREAMER_TINY, PPO_ROUTING_TINY, last_json, mappo_tiny

DREAMER_ROUTING_RUN = [*DREAMER_ROUTING_TINY, "train.iterations=2", "train.episodes_per_iter=4", "replay.prefill=4",
                       "replay.batch_size=2", "replay.train_ratio=2", "eval.every=1", "eval.diag_starts=2"]


def _small_dev_set(tmp_path: Path, problem: str = "tsp", n: int = 6) -> Path:
    """The first ``n`` instances of the bundled tsp20/cvrp20 dev set as their own .npz (fast evaluations)."""
    from envs.routing import dev_set_path

    with np.load(dev_set_path(f"{problem}20")) as data:
        arrays = {k: (data[k][:n] if data[k].ndim else data[k]) for k in data.files}
    path = tmp_path / f"{problem}20_dev_first{n}.npz"
    np.savez(path, **arrays)
    return path


def _tiny_dreamer_cfg(problem: str = "cvrp", size: int = 8, seed: int = 0):
    model = dreamer_routing.RoutingModelConfig(embed_dim=16, heads=2, ff_dim=32, encoder_layers=1, deter=16, hidden=8,
                                               units=16, stoch=4, classes=4, blocks=2, action_dim=8)
    return dreamer_routing.DreamerRoutingConfig(seed=seed, env=RoutingEnvConfig(problem=problem, size=size), model=model,
                                                tune_malloc=False)


def test_dreamer_routing_dev_evaluation_is_seeded_and_leaves_the_rng_alone():
    cfg = _tiny_dreamer_cfg()
    torch.manual_seed(0)
    agent, _, _ = dreamer_routing.build(cfg)
    with torch.no_grad():  # random weights large enough that the sampled latents change greedy moves
        for p in agent.parameters():
            p.normal_(0.0, 1.0)
    data = generate_cvrp(24, 8, torch.Generator().manual_seed(3), capacity=12)
    data["ref_cost"] = torch.ones(24, dtype=torch.float64)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = dreamer_routing.evaluate_dev(agent, cfg, data, chunk=10)
    assert torch.equal(torch.get_rng_state(), state)  # the training stream is not disturbed...
    after_eval = torch.rand(4)
    torch.set_rng_state(state)
    assert torch.equal(torch.rand(4), after_eval)  # ...it continues exactly as without the evaluation
    torch.manual_seed(999)  # whatever the caller's RNG holds: the same weights and seed give the same numbers
    second = dreamer_routing.evaluate_dev(agent, cfg, data, chunk=10)
    assert first["eval/gap_pct"] == second["eval/gap_pct"]
    assert first["eval/tour_length"] == second["eval/tour_length"]
    # the decoding does draw random numbers (latent samples): the seed matters, so the test above means something
    gaps = set()
    for seed in range(4):
        cfg.seed = seed
        gaps.add(dreamer_routing.evaluate_dev(agent, cfg, data, chunk=10)["eval/gap_pct"])
    assert len(gaps) > 1
    # the tours picture decodes only the first chunk, and gets the evaluated tours of those instances
    cfg.seed = 0
    tours, actions = dreamer_routing.decode_dev(agent, cfg, data, chunk=10, keep=3)
    head, head_actions = dreamer_routing.decode_dev(agent, cfg, data, chunk=10, limit=10, keep=3)
    assert torch.equal(head, tours[:10]) and head_actions == actions and len(actions) == 3


def test_ppo_routing_dev_evaluation_draws_no_random_numbers():
    from baselines.pointer_ppo import evaluate_dev
    from torchrl_dreamer.pointer import PointerActorCritic

    torch.manual_seed(0)
    model = PointerActorCritic("cvrp", embed_dim=16, n_layers=1, n_heads=2, ff_dim=32)
    data = generate_cvrp(5, 6, torch.Generator().manual_seed(4), capacity=12)
    data["ref_cost"] = torch.ones(5, dtype=torch.float64)
    state = torch.get_rng_state()
    first = evaluate_dev(model, data, problem="cvrp", multistart=True, augment=2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    assert evaluate_dev(model, data, problem="cvrp", multistart=True, augment=2)["gap_pct"] == first["gap_pct"]


@pytest.fixture(scope="module")
def routing_runs(tmp_path_factory):
    """One tiny PPO and one tiny Dreamer routing run on a 6-instance TSP20 dev set, shared by the
    tests below (they only evaluate them)."""
    tmp = tmp_path_factory.mktemp("routing_eval")
    dev = _small_dev_set(tmp)
    ppo_dir = routing.main(["--algo", "ppo", "--env", "tsp20", *PPO_ROUTING_TINY, f"env.dev_set={dev}", f"run.root={tmp}"])
    dreamer_dir = routing.main(["--algo", "dreamer", "--env", "tsp20", *DREAMER_ROUTING_RUN, f"env.dev_set={dev}",
                                f"run.root={tmp}"])
    return {"ppo": ppo_dir, "dreamer": dreamer_dir, "dev": dev}


@pytest.mark.smoke
def test_routing_evaluation_json_has_the_same_keys_for_ppo_and_dreamer(routing_runs, capsys):
    records = {}
    for algo in ("ppo", "dreamer"):
        run_dir = routing_runs[algo]
        assert (run_dir / "tours.png").stat().st_size > 5000  # both recipes draw it at the end of training
        (run_dir / "tours.png").unlink()
        capsys.readouterr()
        routing.main(["--evaluate", str(run_dir)])
        printed = last_json(capsys.readouterr().out)
        assert json.loads((run_dir / "eval.json").read_text()) == printed  # the same record, saved
        assert (run_dir / "tours.png").stat().st_size > 5000
        records[algo] = printed
    assert tuple(records["ppo"]) == tuple(records["dreamer"]) == ROUTING_EVAL_KEYS
    for algo, record in records.items():
        assert record["algo"] == algo and record["problem"] == "tsp" and record["size"] == 20
        assert record["dev_set"] == str(routing_runs["dev"]) and record["instances"] == 6
        assert Path(record["dev_set_file"]).name == routing_runs["dev"].name
        assert record["decoding"] == "greedy" and record["seed"] == 0 and record["gap_pct"] > 0
        assert record["checkpoint"] == str(routing_runs[algo] / "checkpoint.pt")
    # PPO's decoding options are recorded; Dreamer's seeded evaluation repeats exactly
    routing.main(["--evaluate", str(routing_runs["ppo"]), "eval.multistart=true", "eval.augment=2"])
    assert last_json(capsys.readouterr().out)["decoding"] == "greedy+multistart+augment=2"
    routing.main(["--evaluate", str(routing_runs["dreamer"])])
    again = last_json(capsys.readouterr().out)
    assert again["gap_pct"] == records["dreamer"]["gap_pct"] and again["tour_length"] == records["dreamer"]["tour_length"]


@pytest.mark.smoke
@pytest.mark.parametrize("algo", ["ppo", "dreamer"])
def test_evaluate_on_a_read_only_run_directory_still_prints_the_numbers(algo, routing_runs, capsys, monkeypatch):
    """Simulated with writes that fail as on a read-only mount (so the test runs as root too)."""
    run_dir = routing_runs[algo]
    for name in ("eval.json", "tours.png"):
        (run_dir / name).unlink(missing_ok=True)

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(evaluation, "write_json_atomic", read_only)
    monkeypatch.setattr(routing_eval, "plot_tours", read_only)  # both recipes draw through it
    capsys.readouterr()
    assert routing.main(["--evaluate", str(run_dir)]) == run_dir
    out, err = capsys.readouterr()
    printed = last_json(out)
    assert printed["gap_pct"] > 0 and printed["algo"] == algo
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert any("eval.json not written" in n and "not writable" in n for n in notes), err
    assert any("tours.png not drawn" in n and "not writable" in n for n in notes), err
    assert "Traceback" not in err
    assert not (run_dir / "eval.json").exists() and not (run_dir / "tours.png").exists()


@pytest.mark.smoke
def test_evaluate_on_a_chmod_read_only_run_directory(routing_runs, capsys):
    """The real thing, where chmod blocks writes (not as root)."""
    run_dir = routing_runs["ppo"]
    for name in ("eval.json", "tours.png"):
        (run_dir / name).unlink(missing_ok=True)
    run_dir.chmod(0o555)
    try:
        import os

        if os.access(run_dir, os.W_OK):
            pytest.skip("chmod does not block writes here (root)")
        capsys.readouterr()
        routing.main(["--evaluate", str(run_dir)])
        out, err = capsys.readouterr()
        assert last_json(out)["gap_pct"] > 0
        assert "eval.json not written" in err and "tours.png not drawn" in err and "Traceback" not in err
    finally:
        run_dir.chmod(0o755)


@pytest.mark.smoke
@pytest.mark.parametrize("algo", ["ppo", "dreamer"])
def test_eval_json_is_written_before_the_tours_picture(algo, routing_runs, capsys, monkeypatch):
    run_dir = routing_runs[algo]
    (run_dir / "eval.json").unlink(missing_ok=True)
    seen = {}

    def broken_plot(path, *args, **kwargs):
        seen["eval.json"] = (run_dir / "eval.json").is_file()
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(routing_eval, "plot_tours", broken_plot)
    capsys.readouterr()
    routing.main(["--evaluate", str(run_dir)])
    out, err = capsys.readouterr()
    assert seen == {"eval.json": True}
    assert json.loads((run_dir / "eval.json").read_text()) == last_json(out)
    assert "tours.png not drawn: RuntimeError: matplotlib exploded" in err and "Traceback" not in err


@pytest.mark.smoke
def test_ppo_routing_training_without_a_dev_set_notes_the_missing_tours(tmp_path, capsys):
    run_dir = routing.main(["--algo", "ppo", "--env", "tsp20", *PPO_ROUTING_TINY, "env.dev_set=''", f"run.root={tmp_path}"])
    assert (run_dir / "curves.png").is_file() and not (run_dir / "tours.png").exists()
    assert "note: tours.png not drawn: no dev set" in capsys.readouterr().err


def test_report_evaluation_is_atomic_and_survives_an_unwritable_directory(tmp_path, capsys):
    path = evaluation.report_evaluation({"a": 1.5}, tmp_path)
    assert path == tmp_path / "eval.json" and json.loads(path.read_text()) == {"a": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left behind
    assert last_json(capsys.readouterr().out) == {"a": 1.5}
    assert evaluation.report_evaluation({"a": 2}, tmp_path / "missing") is None
    out, err = capsys.readouterr()
    assert last_json(out) == {"a": 2} and err.startswith("note: eval.json not written")
    assert evaluation.evaluation_paths(tmp_path) == (tmp_path, tmp_path / "checkpoint.pt", "")
    (tmp_path / "best.pt").touch()
    assert evaluation.evaluation_paths(tmp_path / "best.pt") == (tmp_path, tmp_path / "best.pt", "_best")


@pytest.mark.smoke
def test_dreamer_and_mappo_evaluate_write_eval_json_and_survive_read_only(tmp_path, capsys, monkeypatch):
    from recipes import dreamer, mappo_vmas

    d_tiny = [*DREAMER_TINY, "train.env_steps=48", "eval.every=0"]
    m_tiny = [*mappo_tiny(), "collector.iterations=1"]
    runs = {dreamer: dreamer.main(["--env", "cartpole", *d_tiny, f"run.root={tmp_path}"]),
            mappo_vmas: mappo_vmas.main(["--env", "navigation", *m_tiny, f"run.root={tmp_path}"])}
    for recipe, run_dir in runs.items():
        capsys.readouterr()
        recipe.main(["--evaluate", str(run_dir)])
        printed = last_json(capsys.readouterr().out)
        assert json.loads((run_dir / "eval.json").read_text()) == printed
        assert printed["checkpoint"] == str(run_dir / "checkpoint.pt") and "eval/episode_reward_sum" in printed
    def not_permitted(path, record):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(evaluation, "write_json_atomic", not_permitted)
    for recipe, run_dir in runs.items():
        (run_dir / "eval.json").unlink()
        capsys.readouterr()
        recipe.main(["--evaluate", str(run_dir)])
        out, err = capsys.readouterr()
        assert "eval/episode_reward_sum" in last_json(out)
        assert "note: eval.json not written" in err and "Traceback" not in err
        assert not (run_dir / "eval.json").exists()


def test_learning_curves_name_what_the_x_axis_counts(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "train/episode_reward_sum": float(s), "loss/critic": 1.0 / s}) for s in (8, 16, 24)))
    fig = learning_curves_figure(tmp_path, x_label="training instances")
    try:
        labels = [ax.get_xlabel() for ax in fig.axes]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert labels and all(label == "training instances" for label in labels)
    default = learning_curves_figure(tmp_path)
    assert default.axes[0].get_xlabel() == "env frames"
    import matplotlib.pyplot as plt

    plt.close(default)
    path = plot_learning_curves(tmp_path, x_label="training episodes (instances)")
    assert path == tmp_path / "curves.png" and path.stat().st_size > 1000
