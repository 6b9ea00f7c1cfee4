"""Data-parallel learners under ``torchrun`` (gloo, 2 ranks on this CPU): the same step as one process,
one run directory, rank 0's time budget for all, a dead rank is an error and not a hang."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_metrics

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow  # each case starts two fresh Python processes with torch (~5 s)

ROUTING = ["--env", "tsp20", "eval.every=2", "ppo.batch_instances=16", "ppo.minibatch_instances=8",
           "ppo.epochs=1", "model.embed_dim=16", "model.n_layers=1", "model.n_heads=2", "model.ff_dim=16",
           "run.progress=false", "run.tensorboard=false", "threads=1"]
MAPPO = ["--env", "navigation", "collector.iterations=2", "ppo.epochs=1", "ppo.compile=false", "model.width=16",
         "eval.every=1", "eval.num_envs=2", "run.progress=false", "run.tensorboard=false", "env.max_steps=10",
         "collector.frames_per_batch=40", "ppo.minibatch_size=20", "threads=1"]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def result_line(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))


def test_two_ranks_on_half_batches_take_the_one_process_step():
    """Routing PPO (TSP with GAE; CVRP multi-start with the first-move term) and MAPPO: the parameters
    after one step of two gloo ranks on half batches equal one process's step on the whole batch."""
    proc = torchrun(str(HERE / "ddp_worker.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = result_line(proc.stdout)
    assert result["world_size"] == 2
    for case in ("tsp", "cvrp_multistart", "mappo"):
        assert result[case] < 2e-6, result


def test_without_the_gradient_all_reduce_the_steps_differ():
    """The check above can fail: ranks that do not share gradients end up ~1e-2 apart."""
    proc = torchrun(str(HERE / "ddp_worker.py"), "--no-sync")
    assert proc.returncode != 0
    result = result_line(proc.stdout)
    assert min(result[c] for c in ("tsp", "cvrp_multistart", "mappo")) > 1e-4, result


def test_routing_ppo_under_torchrun_writes_one_run_and_resumes_with_rank0s_time_budget(tmp_path):
    proc = torchrun("-m", "recipes.ppo_routing", *ROUTING, "train.iterations=4", f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "ppo_routing" / "tsp20").iterdir())
    assert len(runs) == 1, runs  # rank 1 opened no run directory of its own
    assert "2 data-parallel ranks" in proc.stdout
    rows = read_metrics(runs[0])
    assert [r["train/instances"] for r in rows] == [16, 32, 48, 64]  # global instances: both ranks' shares
    assert sum("eval/gap_pct" in r for r in rows) == 2  # rank 0 evaluated, once per due iteration
    assert (runs[0] / "checkpoint.pt").is_file()
    # a resume under torchrun with a 1 s budget: rank 0's clock stops both ranks after the same iteration
    proc = torchrun("-m", "recipes.ppo_routing", "--resume", str(runs[0]), "train.iterations=100000",
                    "run.time_budget_s=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(runs[0])
    assert rows[-1]["train/iteration"] > 4 and rows[-1]["train/instances"] == 16 * rows[-1]["train/iteration"]


def test_mappo_under_torchrun_counts_both_ranks_frames(tmp_path):
    proc = torchrun("-m", "recipes.mappo_vmas", *MAPPO, f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (run,) = list((tmp_path / "mappo_vmas" / "navigation").iterdir())
    rows = read_metrics(run)
    assert [r["train/frames"] for r in rows] == [40, 80]
    assert all("eval/episode_reward_sum" in r for r in rows)


def test_a_killed_rank_ends_the_run_with_an_error_not_a_hang(tmp_path):
    proc = torchrun(str(HERE / "die_on_rank1.py"), *ROUTING, "train.iterations=50", f"run.root={tmp_path}",
                    timeout=180)
    assert proc.returncode != 0
    assert "die_on_rank1.py FAILED" in proc.stderr or "Signal 9" in proc.stderr, proc.stderr[-3000:]


def test_recipes_without_data_parallel_refuse_torchrun(tmp_path):
    proc = torchrun("-m", "recipes.dreamer", "--env", "cartpole", f"run.root={tmp_path}", timeout=180)
    assert proc.returncode != 0
    assert "error: the dreamer recipe does not train data-parallel" in proc.stderr
    assert not (tmp_path / "dreamer").exists()
