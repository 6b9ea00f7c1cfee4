"""Bad input never costs a run: one ``error: ...`` line, exit code 2, and nothing created or changed.

Table-driven: one row per bad input (recipe, arguments, the message it must print). Each row runs
the recipe's command-line entry (``run_cli(main, argv)``, what ``python -m`` and the console
scripts call) and asserts the exit code, that stderr is exactly one line starting ``error:`` that
matches the message, and that no run directory appeared under ``run.root``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.ppo_routing import main as ppo_routing_main
from recipes.dreamer import main as dreamer_main
from recipes.mappo_vmas import main as mappo_main
from recipes.routing import main as routing_main
from torchrl_dreamer.runtime import EXIT_INPUT, LOCK_NAME, run_cli

from helpers import DREAMER_TINY, PPO_ROUTING_TSP_RUN, REPO


ROWS = [
    # --- DreamerV3 (recipes.dreamer) ---
    ("dreamer", ["ac.discount=1.5"], r"ac\.discount must be in \(0, 1\], got 1\.5"),
    ("dreamer", ["ac.discount=0"], r"ac\.discount must be in \(0, 1\], got 0"),
    ("dreamer", ["ac.lmbda=-0.1"], r"ac\.lmbda must be in \[0, 1\]"),
    ("dreamer", ["env.still_tol=-1"], r"env\.still_tol must be >= 0, got -1"),
    ("dreamer", ["env.pixels=true", "env.still_tol=0.01"], r"env\.still_tol counts steps at rest .* env\.pixels=true"),
    ("dreamer", ["env.action_repeat=0"], r"env\.action_repeat must be >= 1, got 0"),
    ("dreamer", ["--env", "custom", "env.action_repeat=2"], r"env\.action_repeat applies to Gymnasium ids"),
    ("dreamer", ["env.pixels=true", "env.time_feature=true"], r"env\.time_feature appends to the vector observation"),
    ("dreamer", ["loss.terminal_reward_weight=-1"], r"loss\.terminal_reward_weight must be > 0, got -1"),
    ("dreamer", ["ac.group_size=0"], r"ac\.group_size must be >= 1, got 0"),
    ("dreamer", ["--env", "pendulum", "ac.actor_grad=dynamics", "ac.group_size=4"],
     r"ac\.group_size > 1 \(group baseline\) needs ac\.actor_grad=reinforce"),
    ("dreamer", ["optim.actor_lr=inf"], r"optim\.actor_lr must be a finite number"),
    ("dreamer", ["optim.world_model_lr=-1e-4"], r"optim\.world_model_lr must be > 0"),
    ("dreamer", ["optim.agc=0"], r"optim\.agc must be > 0"),
    ("dreamer", ["run.checkpoint_every=0"], r"run\.checkpoint_every must be >= 1"),
    ("dreamer", ["eval.every=-5"], r"eval\.every must be >= 0"),
    ("dreamer", ["train.env_steps=0"], r"train\.env_steps must be >= 1"),
    ("dreamer", ["eval.confirm_episodes=-1"], r"eval\.confirm_episodes must be >= 0"),
    ("dreamer", ["replay.prefill=10"], r"replay\.prefill \(10\) must be at least env\.num_envs \* replay\.seq_len"),
    ("dreamer", ["replay.capacity=100"], r"replay\.capacity is smaller than one batch"),
    ("dreamer", ["device=cude"], r"device: 'cude' is not a torch device string"),
    ("dreamer", ["env.factory=no_such_pkg.mod:make"], r"env\.factory 'no_such_pkg\.mod:make': cannot import module"),
    ("dreamer", ["env.factory=envs.goal_reaching:nope"], r"has no attribute 'nope'"),
    ("dreamer", ["env.name=CartPole-v9"], r"unknown Gymnasium env id 'CartPole-v9'"),
    ("dreamer", ["model.size=huge"], r"model\.size must be one of"),
    ("dreamer", ["bogus.key=1"], r"unknown config key 'bogus'"),
    ("dreamer", ["train.env_steps=lots"], r"wrong type for config key 'train\.env_steps'"),
    ("dreamer", ["--env", "no_such_env"], r"no config for env 'no_such_env'"),
    ("dreamer", ["--config", "/no/such/file.yaml"], r"config file not found: /no/such/file\.yaml"),
    ("dreamer", ["--resume", "/no/such/run"], r"cannot resume: /no/such/run/config\.yaml does not exist"),
    ("dreamer", ["--evaluate", "/no/such/run"], r"cannot evaluate: /no/such/run does not exist"),
    ("dreamer", ["run.root=/proc/no_runs_here"], r"run\.root: cannot create a run directory under /proc/no_runs_here"),
    # --- MAPPO / IPPO on VMAS (recipes.mappo_vmas) ---
    ("mappo", ["ppo.max_grad_norm=0"], r"ppo\.max_grad_norm must be > 0"),
    ("mappo", ["ppo.gamma=1.01"], r"ppo\.gamma must be in \(0, 1\]"),
    ("mappo", ["ppo.clip_epsilon=-0.2"], r"ppo\.clip_epsilon must be > 0"),
    ("mappo", ["ppo.lr=nan"], r"ppo\.lr must be a finite number"),
    ("mappo", ["collector.iterations=0"], r"collector\.iterations must be >= 1"),
    ("mappo", ["model.init_scale=0"], r"model\.init_scale must be > 0"),
    ("mappo", ["run.checkpoint_every=0"], r"run\.checkpoint_every must be >= 1"),
    ("mappo", ["eval.every=-1"], r"eval\.every must be >= 0"),
    ("mappo", ["env.scenario=navigaton"], r"unknown VMAS scenario 'navigaton'"),
    ("mappo", ["collector.frames_per_batch=150"], r"must be a multiple of env\.max_steps"),
    ("mappo", ["--env", "custom", "env.kwargs.bogus=1"], r"env\.factory 'envs\.goal_reaching:make_env' (failed|does not fit).*bogus"),
    ("mappo", ["ppo.impl=jax"], r"ppo\.impl must be one of"),
    # --- PPO + pointer network on routing (recipes.routing --algo ppo) ---
    ("ppo_routing", ["model.n_heads=7"], r"model\.n_heads \(7\) must divide model\.embed_dim \(128\)"),
    ("ppo_routing", ["env.size=1"], r"env\.size must be >= 2, got 1"),
    ("ppo_routing", ["ppo.lmbda=2"], r"ppo\.lmbda must be in \[0, 1\]"),
    ("ppo_routing", ["ppo.max_grad_norm=-1"], r"ppo\.max_grad_norm must be > 0"),
    ("ppo_routing", ["ppo.clip_epsilon=0"], r"ppo\.clip_epsilon must be > 0"),
    ("ppo_routing", ["train.iterations=0"], r"train\.iterations must be >= 1"),
    ("ppo_routing", ["env.problem=vrp"], r"env\.problem must be one of tsp, cvrp; got 'vrp'"),
    ("ppo_routing", ["env.problem=cvrp", "env.dev_set=tsp20"], r"env\.dev_set.*TSP.*cvrp"),
    ("ppo_routing", ["env.dev_set=/no/such/set.npz"], r"env\.dev_set.*/no/such/set\.npz"),
    ("ppo_routing", ["--env", "cvrp20", "env.capacity=5"], r"env\.capacity \(5\) is below the largest customer demand"),
    # --- DreamerV3 on routing (recipes.routing --algo dreamer) ---
    ("dreamer_routing", ["ac.discount=0"], r"ac\.discount must be in \(0, 1\]"),
    ("dreamer_routing", ["eval.every=-1"], r"eval\.every must be >= 0"),
    ("dreamer_routing", ["model.heads=3"], r"model\.heads \(3\) must divide model\.embed_dim \(128\)"),
    ("dreamer_routing", ["train.curriculum=abc"], r"train\.curriculum: expected 'size:iterations"),
    ("dreamer_routing", ["optim.critic_lr=0"], r"optim\.critic_lr must be > 0"),
    ("dreamer_routing", ["env.size=1"], r"env\.size must be >= 2"),
    ("dreamer_routing", ["model.load_features=true"], r"model\.load_features adds CVRP's demand features; env\.problem is 'tsp'"),
    ("dreamer_routing", ["loss.terminal_reward_weight=0"], r"loss\.terminal_reward_weight must be > 0"),
    ("dreamer_routing", ["ac.group_size=0"], r"ac\.group_size must be >= 1"),
    ("dreamer_routing", ["device=cuda:7x"], r"device: 'cuda:7x' is not a torch device string"),
]

ENTRIES = {
    "dreamer": (dreamer_main, []),
    "mappo": (mappo_main, []),
    "ppo_routing": (routing_main, ["--algo", "ppo"]),
    "dreamer_routing": (routing_main, ["--algo", "dreamer"]),
}


def run_entry(main, argv, capsys) -> tuple[int, str]:
    """``run_cli(main, argv)``: the exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def test_the_table_covers_every_recipe_with_enough_rows():
    assert len(ROWS) >= 30
    assert {recipe for recipe, _, _ in ROWS} == set(ENTRIES)


@pytest.mark.parametrize("recipe,args,message", ROWS, ids=[f"{r}:{' '.join(a)}" for r, a, _ in ROWS])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(recipe, args, message, tmp_path, capsys):
    main, prefix = ENTRIES[recipe]
    root = tmp_path / "runs"
    code, err = run_entry(main, [*prefix, f"run.root={root}", *args], capsys)  # a row may set run.root itself
    assert code == EXIT_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pytest.importorskip("re").search(message, lines[0]), lines[0]
    assert not root.exists(), "a run directory was created for a bad input"


def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_entry(dreamer_main, ["device=cuda", f"run.root={tmp_path / 'runs'}"], capsys)
    assert code == EXIT_INPUT and "CUDA is not available" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("module,args", [
    ("recipes.dreamer", ["ac.discount=1.5"]),
    ("recipes.mappo_vmas", ["ppo.gamma=2"]),
    ("recipes.routing", ["--algo", "ppo", "model.n_heads=7"]),
    ("recipes.routing", ["--algo", "dreamer", "model.heads=3"]),
])
def test_python_m_prints_one_line_and_exits_2(module, args, tmp_path):
    """The real command line: no traceback, one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", module, *args, f"run.root={tmp_path / 'runs'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


# --- a failed resume changes nothing ---------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_ppo_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    return ppo_routing_main([*PPO_ROUTING_TSP_RUN, f"run.root={root}"])


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


@pytest.mark.smoke
@pytest.mark.parametrize("args,message", [
    (["train.iterations=3", "model.embed_dim=32"], r"weights do not fit the network this config builds.*size mismatch"),
    (["train.iterations=3", "device=cude"], r"device: 'cude' is not a torch device string"),
    (["train.iterations=3", "ppo.gamma=7"], r"ppo\.gamma must be in \(0, 1\]"),
    (["train.iterations=1"], r"nothing to do: the run already has 1 iterations"),
    (["train.iterations=3", "env.problem=cvrp"], r"weights do not fit|env\.dev_set|checkpoint"),
])
def test_failed_resume_leaves_the_run_directory_byte_identical(finished_ppo_run, args, message, capsys):
    before = snapshot(finished_ppo_run)
    code, err = run_entry(routing_main, ["--resume", str(finished_ppo_run), *args], capsys)
    assert code == EXIT_INPUT, err
    assert pytest.importorskip("re").search(message, err), err
    assert snapshot(finished_ppo_run) == before  # config.yaml, checkpoint, metrics: untouched; no lock left


@pytest.mark.smoke
def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(finished_ppo_run, capsys):
    before = snapshot(finished_ppo_run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (finished_ppo_run / LOCK_NAME).write_text(f"{holder.pid} {os.uname().nodename}\n")
        code, err = run_entry(routing_main, ["--resume", str(finished_ppo_run), "train.iterations=2"], capsys)
        assert code == EXIT_INPUT and f"in use by process {holder.pid}" in err, err
        assert (finished_ppo_run / "config.yaml").read_bytes() == before["config.yaml"]
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and a resume takes it over with a note
    run_cli(routing_main, ["--resume", str(finished_ppo_run), "train.iterations=2"])
    err = capsys.readouterr().err
    assert f"taking over the lock {finished_ppo_run / LOCK_NAME} left by process {holder.pid}" in err
    assert not (finished_ppo_run / LOCK_NAME).exists()  # released at the end
    steps = [line for line in (finished_ppo_run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2


@pytest.mark.smoke
def test_unreadable_checkpoints_name_the_files(tmp_path, capsys):
    run_dir = ppo_routing_main([*PPO_ROUTING_TSP_RUN, f"run.root={tmp_path}"])
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = snapshot(run_dir)
    code, err = run_entry(routing_main, ["--resume", str(run_dir), "train.iterations=2"], capsys)
    assert code == EXIT_INPUT
    assert "no readable checkpoint" in err and "checkpoint.pt" in err and "checkpoint.prev.pt is missing" in err
    assert snapshot(run_dir) == before
    code, err = run_entry(routing_main, ["--evaluate", str(run_dir / "checkpoint.pt"), "env.dev_set=tsp20"], capsys)
    assert code == EXIT_INPUT and f"cannot read checkpoint {run_dir / 'checkpoint.pt'}" in err, err


@pytest.mark.smoke
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing a checkpoint: one line naming the file, exit 2; the previous checkpoint
    is intact and no temporary file is left."""
    import errno

    import torchrl_dreamer.checkpoint as checkpoint

    run_dir = ppo_routing_main([*PPO_ROUTING_TSP_RUN, f"run.root={tmp_path}"])
    good = (run_dir / "checkpoint.pt").read_bytes()

    def full_disk(state, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", handle.name)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code, err = run_entry(routing_main, ["--resume", str(run_dir), "train.iterations=2"], capsys)
    assert code == EXIT_INPUT
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot write ") and "No space left on device" in line and ".checkpoint.pt.tmp-" in line
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert not list(run_dir.glob(".*tmp*")) and not (run_dir / LOCK_NAME).exists()


@pytest.mark.smoke
def test_a_corrupt_best_pt_never_blocks_a_resume(tmp_path, capsys):
    from recipes.dreamer import main as dreamer_main_

    run_dir = dreamer_main_(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_path}", "eval.every=32", "train.env_steps=64"])
    (run_dir / "best.pt").write_bytes(b"garbage")
    capsys.readouterr()
    run_cli(dreamer_main_, ["--resume", str(run_dir), "train.env_steps=96"])
    err = capsys.readouterr().err
    assert f"warning: ignoring {run_dir / 'best.pt'}" in err
    assert len([line for line in (run_dir / "metrics.jsonl").read_text().splitlines()]) >= 3


@pytest.mark.smoke
@pytest.mark.parametrize("args,message", [
    (["train.env_steps=96", "replay.capacity=20"], r"replay\.capacity=20 is smaller than the \d+ replay rows in the checkpoint"),
    (["train.env_steps=96", "model.units=24"], r"checkpoint's weights do not fit the model this config builds.*size mismatch"),
    (["train.env_steps=96", "env.factory=no_such_pkg.mod:make"], r"cannot import module"),
])
def test_failed_dreamer_resume_leaves_the_run_directory_byte_identical(tmp_path, args, message, capsys):
    from recipes.dreamer import main as dreamer_main_

    run_dir = dreamer_main_(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_path}", "eval.every=0", "train.env_steps=48"])
    before = snapshot(run_dir)
    code, err = run_entry(dreamer_main_, ["--resume", str(run_dir), *args], capsys)
    assert code == EXIT_INPUT, err
    assert pytest.importorskip("re").search(message, err), err
    assert snapshot(run_dir) == before
