"""Routing dev sets bundled with the package (envs/data): loading by name or path, clear errors,
recipes that find them from any working directory, and no reference to data outside the repository."""
import json
import shutil

import numpy as np
import pytest

from envs.routing import BUNDLED_DEV_SETS, DevSetError, dev_set_path, load_dev_set
from recipes import routing
from torchrl_dreamer.config import ConfigError

from helpers import PPO_ROUTING_TINY


@pytest.mark.parametrize("name, problem, size, mean", [
    ("tsp20", "tsp", 20, 3.8507), ("tsp50", "tsp", 50, 5.6914),
    ("cvrp20", "cvrp", 20, 6.1689), ("cvrp50", "cvrp", 50, 10.3902),
])
def test_bundled_sets_load_by_name_with_shapes_and_reference_mean(name, problem, size, mean):
    assert name in BUNDLED_DEV_SETS
    d = load_dev_set(name, problem, size)
    assert tuple(d["locs"].shape) == (200, size, 2)
    assert tuple(d["ref_cost"].shape) == (200,)
    assert d["ref_cost"].mean().item() == pytest.approx(mean, abs=1e-4)
    if problem == "tsp":
        assert tuple(d["ref_tour"].shape) == (200, size)
    else:
        assert tuple(d["depot"].shape) == (200, 2) and tuple(d["demand"].shape) == (200, size)
        assert tuple(d["capacity"].shape) == (200,) and d["demand"].is_floating_point()
    # the other spellings of the name, and no problem/size given: the same file, detected from its keys
    for spec in (f"{name}_dev", f"{name}_dev.npz"):
        assert dev_set_path(spec) == dev_set_path(name)
        assert load_dev_set(spec)["ref_cost"].equal(d["ref_cost"])
    path = dev_set_path(name)
    assert path.parent.name == "data" and path.parent.parent.name == "envs" and path.is_file()
    assert (path.parent / f"{name}_dev_meta.json").is_file() and (path.parent / "README.md").is_file()


def test_bundled_names_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_dev_set("tsp20", "tsp", 20)["locs"].shape[0] == 200


def test_user_paths_absolute_or_relative_to_the_current_directory(tmp_path, monkeypatch):
    shutil.copy(dev_set_path("tsp20"), tmp_path / "mine.npz")
    monkeypatch.chdir(tmp_path)
    assert load_dev_set("mine.npz", "tsp", 20)["ref_cost"].shape == (200,)
    assert load_dev_set(str(tmp_path / "mine.npz"), "tsp", 20)["ref_cost"].shape == (200,)


def test_tsp_set_for_cvrp_names_the_file_and_the_problem():
    with pytest.raises(DevSetError) as err:
        load_dev_set("tsp20", "cvrp", 20)
    msg = str(err.value)
    assert "tsp20_dev.npz" in msg and "TSP" in msg and "cvrp" in msg and "cvrp20" in msg and "\n" not in msg
    with pytest.raises(DevSetError, match=r"cvrp20_dev\.npz is a CVRP dev set .* env.problem is tsp; use env.dev_set=tsp20"):
        load_dev_set("cvrp20", "tsp", 20)


def test_missing_path_names_the_path_and_the_bundled_names(tmp_path):
    missing = tmp_path / "nowhere" / "tsp20_dev_v2.npz"
    with pytest.raises(DevSetError) as err:
        load_dev_set(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and all(name in msg for name in BUNDLED_DEV_SETS)
    with pytest.raises(DevSetError, match="tsp100"):
        load_dev_set("tsp100")  # not bundled: read as a (missing) path


def test_missing_keys_name_the_file_and_the_expected_keys(tmp_path):
    path = tmp_path / "no_ref.npz"
    np.savez(path, locs=np.random.rand(3, 5, 2).astype(np.float32))
    with pytest.raises(DevSetError) as err:
        load_dev_set(str(path))
    msg = str(err.value)
    assert str(path) in msg and "ref_cost" in msg and "locs" in msg
    cvrp = tmp_path / "cvrp_no_capacity.npz"
    np.savez(cvrp, depot=np.zeros((3, 2), np.float32), locs=np.zeros((3, 5, 2), np.float32),
             demand=np.ones((3, 5), np.int64), ref_cost=np.ones(3))
    with pytest.raises(DevSetError, match=r"lacks capacity.*depot, locs, demand, capacity, ref_cost"):
        load_dev_set(str(cvrp), "cvrp")


def test_size_and_shape_mismatches_and_corrupt_files(tmp_path):
    with pytest.raises(DevSetError, match=r"tsp20_dev\.npz has 20 nodes per instance but env.size is 50; use env.dev_set=tsp50"):
        load_dev_set("tsp20", "tsp", 50)
    with pytest.raises(DevSetError, match="50 customers per instance but env.size is 20"):
        load_dev_set("cvrp50", "cvrp", 20)
    bad = tmp_path / "bad_ref.npz"
    np.savez(bad, locs=np.zeros((3, 5, 2), np.float32), ref_cost=np.ones(4))
    with pytest.raises(DevSetError, match=r"bad_ref\.npz: ref_cost has shape \[4\] but locs holds 3 instances"):
        load_dev_set(str(bad))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(dev_set_path("tsp20").read_bytes()[:1000])  # truncated archive
    with pytest.raises(DevSetError, match=r"corrupt\.npz cannot be read"):
        load_dev_set(str(corrupt))
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(DevSetError, match=r"text\.npz cannot be read"):
        load_dev_set(str(text))


@pytest.mark.smoke
def test_recipe_finds_the_bundled_set_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither the repository nor its parent
    run_dir = routing.main(["--algo", "ppo", "--env", "tsp20", "env.dev_set=tsp20", *PPO_ROUTING_TINY, "eval.every=1",
                            f"run.root={tmp_path / 'runs'}"])
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval/gap_pct"] > 0


@pytest.mark.parametrize("algo", ["ppo", "dreamer"])
def test_recipe_rejects_a_dev_set_of_the_wrong_problem_before_writing(algo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"^env\.dev_set: .*tsp20_dev\.npz is a TSP dev set .*env\.problem is cvrp"):
        routing.main(["--algo", algo, "--env", "tsp20", "env.problem=cvrp", "env.dev_set=tsp20",
                      "run.progress=false", "run.tensorboard=false", f"run.root={root}"])
    with pytest.raises(ConfigError, match=r"^env\.dev_set: dev set not found: missing\.npz"):
        routing.main(["--algo", algo, "--env", "tsp20", "env.dev_set=missing.npz",
                      "run.progress=false", "run.tensorboard=false", f"run.root={root}"])
    assert not root.exists()  # validation fails before any run directory is made
