"""The env contract checker: every broken env named in one line with its fix; working envs pass."""
import subprocess
import sys

import pytest

from torchrl_dreamer.check_env import check_factory, env_problems, main

from broken_envs import BROKEN, BROKEN_MAPPO
from helpers import REPO


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("algo", ["dreamer", "ppo"])
def test_each_broken_env_is_named(name, algo):
    factory, expected = BROKEN[name]
    problems = check_factory(factory, algo, num_envs=2)
    assert expected in [p.name for p in problems], problems
    for p in problems:
        line = str(p)
        assert "\n" not in line and "; fix: " in line and line.startswith(f"[{p.name}] ")


def test_the_broken_set_covers_the_contract():
    assert len(BROKEN) >= 8
    assert {"reward", "observation_key", "observation_dtype", "done", "rollout", "mask_shape", "batch",
            "not_torchrl"} <= {expected for _, expected in BROKEN.values()}


@pytest.mark.parametrize("factory,kwargs,fits", [
    ("envs.masked_grid:make_env", {}, {"dreamer", "ppo"}),
    ("envs.masked_grid:make_env", {"action_spec": "one_hot"}, {"dreamer", "ppo"}),
    ("envs.goal_reaching:make_env", {}, {"mappo"}),
])
def test_shipped_envs_fit_their_algorithms(factory, kwargs, fits):
    for algo in ("dreamer", "ppo", "mappo"):
        problems = check_factory(factory, algo, kwargs=kwargs)
        assert (not problems) == (algo in fits), (algo, problems)


def test_gymnasium_ids_through_torchrl_fit_both_single_agent_algorithms():
    from torchrl.envs import GymEnv, SerialEnv

    env = SerialEnv(2, lambda: GymEnv("CartPole-v1"))
    try:
        assert env_problems(env, "dreamer") == [] and env_problems(env, "ppo") == []
    finally:
        env.close()


def test_cli_prints_one_line_per_problem_and_exits_1(capsys):
    assert main(["broken_envs:mask_wrong_shape", "--algo", "dreamer"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("dreamer: ") and all(line.startswith("  [") for line in out[1:])
    assert any("[mask_shape] 'action_mask' has shape [4] per env; expected [5]" in line for line in out)
    assert main(["envs.masked_grid:make_env"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "fits: dreamer, ppo"
    assert main(["no_such_module:make"]) == 1
    assert "[factory]" in capsys.readouterr().out
    assert main(["envs.masked_grid:make_env", "--kwargs", "[1]"]) == 2


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "torchrl_dreamer.check_env", "envs.goal_reaching:make_env", "--algo",
                          "mappo"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "mappo: ok", out.stderr


@pytest.mark.parametrize("name", sorted(BROKEN_MAPPO))
def test_broken_multi_agent_envs_are_named_for_mappo(name):
    factory, expected = BROKEN_MAPPO[name]
    assert expected in [p.name for p in check_factory(factory, "mappo", num_envs=2)]


def test_mappo_start_up_names_a_misnamed_agent_reward(tmp_runs, capsys):
    from recipes.mappo_vmas import main as mappo_main
    from torchrl_dreamer.runtime import run_cli

    with pytest.raises(SystemExit) as info:
        run_cli(mappo_main, ["--env", "custom", "env.factory=broken_envs:multi_agent_misnamed_reward", "env.kwargs={}",
                             f"run.root={tmp_runs}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "[reward_key] the agent reward is named 'agents/rew'" in err[0]
    assert not tmp_runs.exists()
