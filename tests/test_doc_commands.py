"""Every shell command shown in README.md and docs/*.md runs, at tiny settings.

Each ``bash`` block is split into commands (one per line, comments dropped). Recipe commands
(``python -m recipes.<name> ...``) run in-process through the recipe's ``main`` with the command's
own arguments plus that recipe's tiny overrides (``TINY`` below: small networks, a few steps, a
temporary ``run.root``); ``<stamp>`` run directories are replaced by a tiny run of the same recipe
and env made for the purpose; ``mypkg.myenv:make_env`` by the shipped example env of the recipe.
``python -m torchrl_dreamer.check_env`` runs as is. Install lines, ``tensorboard``, the tests
themselves and the benchmark scripts (minutes to hours; their own tests cover them) are listed
in :data:`NOT_RUN` with the reason, so a new kind of command fails here until it is handled.

A block preceded by ``<!-- doc-test: error -->`` shows a command that is meant to fail: it must
end with a one-line error and exit status 2.
"""
from __future__ import annotations

import importlib
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from helpers import DREAMER_ROUTING_TINY, DREAMER_TINY, PPO_ROUTING_TINY, PPO_TINY, REPO, mappo_tiny

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: first words of commands the test does not run, and why
NOT_RUN = {
    "python3 -m venv": "set-up (CI runs the README's test command in a fresh clone)",
    "pip install": "set-up",
    "python -m pytest": "the tests themselves",
    "TORCHRL_DREAMER_TEST_DEVICE=cuda python -m pytest": "the tests themselves, on a GPU",
    "python -c": "a one-line interpreter check (GPU set-up)",
    "tensorboard": "a viewer",
    "python benchmarks/": "benchmarks run for minutes to hours; tests cover their code",
    "ray start": "starts a Ray cluster node (tests/dreamer/test_collectors.py runs Ray locally and as a simulated "
                 "2-node cluster when Ray is installed)",
    "python -m recipes.dreamer --env lunarlander collector.backend=ray": "needs a running Ray cluster (see above)",
    "torchrun": "tests/distributed/test_data_parallel.py runs these recipes under torchrun with 2 gloo ranks",
}

TINY = {
    "recipes.dreamer": [*DREAMER_TINY, "train.env_steps=48", "eval.every=0", "env.max_episode_steps=20",
                        "replay.capacity=100000"],
    "recipes.ppo": [*PPO_TINY, "train.env_steps=32", "eval.every=0", "env.max_episode_steps=20"],
    "recipes.mappo_vmas": [*mappo_tiny(max_steps=5, n_envs=2, minibatch=10), "eval.every=0"],
    ("recipes.routing", "ppo"): [*PPO_ROUTING_TINY, "env.dev_set=''"],
    ("recipes.routing", "dreamer"): [*DREAMER_ROUTING_TINY, "train.iterations=2", "train.episodes_per_iter=8",
                                     "replay.prefill=8", "replay.batch_size=4", "replay.train_ratio=4", "eval.every=0",
                                     "eval.diag_starts=4", "env.dev_set=''"],
}
EXAMPLE_ENV = {"recipes.mappo_vmas": "envs.goal_reaching:make_env"}


def commands() -> list[tuple[str, str, bool]]:
    """``(page:line, command, expect_error)`` for every command line of every bash block."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"(<!-- doc-test: error -->\s*)?```bash\n(.*?)```", text, re.S):
            first_line = text[:m.start(2)].count("\n") + 1
            for i, line in enumerate(m.group(2).splitlines()):
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    out.append((f"{page.relative_to(REPO)}:{first_line + i}", line, bool(m.group(1))))
    return out


COMMANDS = commands()


def _recipe_key(module: str, argv: list[str]):
    """Which recipe's tiny settings apply (``--algo`` picks the other single-agent recipe)."""
    algo = argv[argv.index("--algo") + 1] if "--algo" in argv else None
    if module == "recipes.routing":
        return module, algo or "ppo"
    if module in ("recipes.dreamer", "recipes.ppo") and algo:
        return f"recipes.{algo}"
    return module


_RUNS: dict = {}


def _tiny_run(module: str, argv: list[str], root: Path) -> Path:
    """A finished tiny run of ``module`` on the env a ``<stamp>`` path names (made once per session)."""
    parts = argv  # e.g. runs/ppo_routing/tsp20/<stamp>
    recipe_dir, env_dir = parts[1], parts[2]
    key = (module, recipe_dir, env_dir)
    if key not in _RUNS:
        main = importlib.import_module(module).main
        if module == "recipes.routing":  # with its dev set: --evaluate decodes it
            algo = {"ppo_routing": "ppo", "dreamer_routing": "dreamer"}[recipe_dir]
            args = ["--algo", algo, "--env", env_dir, *[a for a in TINY[(module, algo)] if not a.startswith("env.dev_set")]]
        else:
            env_yaml = {"CartPole-v1": "cartpole", "navigation": "navigation"}[env_dir]
            args = ["--env", env_yaml, *TINY[module]]
        _RUNS[key] = main([*args, f"run.root={root / 'stamped'}"])
    return _RUNS[key]


def _prepare(command: str, tmp_path: Path) -> tuple[str, list[str]]:
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments (shown for the reader)
        words = words[1:]
    assert words[:2] == ["python", "-m"], f"not a python -m command: {command}"
    module, argv = words[2], words[3:]
    example = EXAMPLE_ENV.get(module, "envs.masked_grid:make_env")
    argv = [a.replace("mypkg.myenv:make_env", example) for a in argv]
    if module == "recipes.mappo_vmas" and "envs.goal_reaching:make_env" in argv and not any(
            a.startswith("env.kwargs") for a in argv):
        argv.append("env.kwargs={n_agents: 2}")
    for i, a in enumerate(argv):
        if "<stamp>" in a:  # a private copy of a finished tiny run (resuming changes it)
            run_dir = tmp_path / "stamped_copy"
            shutil.copytree(_tiny_run(module, a.split("/"), tmp_path.parent.parent / "doc_runs"), run_dir)
            argv[i] = str(run_dir / a.split("<stamp>", 1)[1].lstrip("/")) if a.split("<stamp>", 1)[1] else str(run_dir)
    return module, argv


def _is_help(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv


@pytest.mark.smoke
@pytest.mark.parametrize("where,command,expect_error", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_doc_command_runs(where, command, expect_error, tmp_path, capsys):
    skip = next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)
    if skip:
        pytest.skip(f"not run: {skip}")
    if "device=cuda" in command and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    module, argv = _prepare(command, tmp_path)
    if module == "torchrl_dreamer.check_env":
        from torchrl_dreamer.check_env import main as check_main

        assert check_main(argv) == 0, capsys.readouterr().out
        return
    assert module.startswith("recipes."), f"{where}: unhandled command {command}"
    main = importlib.import_module(module).main
    if _is_help(argv):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        return
    key = _recipe_key(module, argv)
    resuming = "--resume" in argv or "--evaluate" in argv
    overrides = [] if resuming and module != "recipes.routing" else TINY[key]
    # the tiny lengths, not the documented ones (the documented settings themselves do apply)
    argv = [a for a in argv if not re.match(r"(train\.env_steps|collector\.iterations|train\.iterations)=", a)]
    if resuming:  # the run's own config.yaml holds the tiny settings; only lengths/episodes may move
        overrides = ["run.progress=false", "run.tensorboard=false"]
        if "--resume" in argv:
            argv.append({"recipes.dreamer": "train.env_steps=96", "recipes.ppo": "train.env_steps=64",
                         "recipes.mappo_vmas": "collector.iterations=3"}.get(module, "train.iterations=3"))
        argv = [a if not a.startswith(("eval.episodes=", "eval.num_envs=")) else a.split("=")[0] + "=2" for a in argv]
    if any("multistart20.yaml" in a for a in argv):  # its 20 rollouts per instance must divide the batch
        overrides = [*overrides, "ppo.batch_instances=20", "ppo.minibatch_instances=20"]
    full = [*overrides, *argv, f"run.root={tmp_path / 'runs'}"]  # the command's own settings win
    if expect_error:
        from torchrl_dreamer.runtime import run_cli

        with pytest.raises(SystemExit) as info:
            run_cli(main, full)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and err and err[-1].startswith("error: "), err
        return
    result = main(full)
    assert Path(result).exists()


def test_every_command_kind_is_handled():
    """A command the test neither runs nor lists in NOT_RUN fails here, not silently."""
    for where, command, _ in COMMANDS:
        words = command.split()
        runnable = command.startswith("python -m ") or (re.match(r"^[A-Z_]+=", words[0]) and "python -m" in command)
        assert runnable or any(command.startswith(p) for p in NOT_RUN), f"{where}: {command}"
