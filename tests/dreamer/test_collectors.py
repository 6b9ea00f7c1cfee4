"""Dreamer collection past one process: TorchRL's process collectors (2 workers) and Ray (local and a
simulated 2-node cluster). Weights reach the workers only through pushes, the prefill switch travels
with them, every env keeps its own replay stream (also after --resume), a dead worker is an error
with a checkpoint and never a hang."""
import functools
import multiprocessing
import os
import signal

import pytest
import torch
from tensordict import TensorDict

from recipes import dreamer
from torchrl_dreamer.checkpoint import load_checkpoint
from torchrl_dreamer.collectors import (CollectorConfig, WeightPusher, WorkerFailedError, WorkerWatchdog, acting_copy,
                                        make_collector, ray_available, shutdown_quietly, worker_chunks)
from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.dreamer.replay import SequenceWriter

from helpers import DREAMER_TINY, read_metrics

E, T = 2, 8


def _cfg(*overrides):
    from torchrl_dreamer.cli import parse_recipe_args
    from torchrl_dreamer.config import to_object

    args = parse_recipe_args(["--env", "cartpole", *DREAMER_TINY, "model.unimix=0", *overrides],
                             schema=dreamer.DreamerConfig, config_dir=dreamer.CONFIG_DIR, description="",
                             default_env="cartpole")
    return to_object(args.cfg)


def _agent(cfg):
    env = dreamer.make_env_from_config(cfg, num_envs=E, seed=0)
    agent, policy = dreamer.build_agent(cfg, env)
    env.close()
    return agent, policy


def _force_action(agent, action: int) -> None:
    """Make the learner's actor pick ``action`` with probability ~1."""
    last = [m for m in agent.actor.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-30.0)
        last.bias[action] = 30.0


def _actions(batch) -> torch.Tensor:
    return batch["action"].argmax(-1).reshape(-1)


# --- units ---------------------------------------------------------------------------------------


def test_worker_chunks_map_every_layout_onto_worker_streams():
    def batch(workers):
        return TensorDict({"worker": torch.tensor(workers).repeat_interleave(E)[:, None].expand(-1, T).clone(),
                           "x": torch.zeros(len(workers) * E, T)}, batch_size=[len(workers) * E, T])

    stacked = batch([0, 1]).reshape(2, E, T)
    assert [w for w, c in worker_chunks(stacked, E)] == [0, 1]
    assert [w for w, c in worker_chunks(batch([1]), E)] == [1]  # an async batch from worker 1
    assert [w for w, c in worker_chunks(TensorDict({"x": torch.zeros(E, T)}, [E, T]), E)] == [0]  # direct: no tag
    mixed = batch([0, 1])
    mixed["worker"][1] = 1
    with pytest.raises(ValueError, match="mixes the envs"):
        list(worker_chunks(mixed, E))


def test_writer_keeps_one_stream_per_env_of_every_worker():
    cfg = _cfg()
    _, policy = _agent(cfg)
    writer = SequenceWriter({"observation": "observation"}, policy.from_env_action, 2 * E)
    td = TensorDict({"observation": torch.zeros(E, T, 4), "action": torch.zeros(E, T, 2), "is_first": torch.zeros(E, T, 1, dtype=torch.bool),
                     "next": {"reward": torch.zeros(E, T, 1), "done": torch.zeros(E, T, 1, dtype=torch.bool),
                              "terminated": torch.zeros(E, T, 1, dtype=torch.bool), "observation": torch.zeros(E, T, 4)}},
                    batch_size=[E, T])
    rows1 = writer(td, first_env=E)  # worker 1's envs first (async order)
    rows0 = writer(td, first_env=0)
    assert set(rows1["stream"].tolist()) == {2, 3} and set(rows0["stream"].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="outside the writer"):
        writer(td, first_env=3)


@pytest.mark.parametrize("override, message", [
    ("collector.num_workers=2", "collector.backend=direct runs the envs in the learner process"),
    ("collector.weight_sync_every=0", "collector.weight_sync_every must be >= 1"),
    ("collector.backend=process collector.num_workers=0", "collector.num_workers must be >= 1"),
])
def test_collector_config_errors(override, message, tmp_runs):
    with pytest.raises(ConfigError, match=message):
        dreamer.main(["--env", "cartpole", *DREAMER_TINY, *override.split(), f"run.root={tmp_runs}"])
    assert not tmp_runs.exists()


def test_ray_backend_without_ray_is_a_config_error(monkeypatch, tmp_runs):
    import torchrl_dreamer.collectors as collectors

    monkeypatch.setattr(collectors, "ray_available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        dreamer.main(["--env", "cartpole", *DREAMER_TINY, "collector.backend=ray", f"run.root={tmp_runs}"])


def test_total_frames_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        make_collector(CollectorConfig(), make_env=lambda w: None, policy=torch.nn.Identity(), frames_per_worker=8,
                       total_frames=-1)


# --- process workers -------------------------------------------------------------------------------


def _process_collector(cfg, policy, sync=True):
    cc = CollectorConfig(backend="process", num_workers=2, sync=sync)
    make_env = functools.partial(dreamer.worker_env, cfg, policy.primer_specs(), 0)
    collector = make_collector(cc, make_env=make_env, policy=acting_copy(policy, cc), frames_per_worker=E * T,
                               total_frames=2 * E * T * 100, learner_threads=torch.get_num_threads())
    return cc, collector


@pytest.mark.slow
def test_process_workers_act_with_pushed_weights_only_and_the_prefill_switch_travels():
    cfg = _cfg()
    agent, policy = _agent(cfg)
    threads = torch.get_num_threads()
    cc, collector = _process_collector(cfg, policy)
    try:
        assert torch.get_num_threads() == threads  # the learner keeps its threads
        watchdog = WorkerWatchdog(collector)
        pusher = WeightPusher(collector, policy, cc, watchdog)
        with watchdog:
            batches = watchdog.iterate(collector)
            first = next(batches)
            assert first.batch_size == (2, E, T)
            assert {w for w, _ in worker_chunks(first, E)} == {0, 1}
            _force_action(agent, 1)  # the learner changes; the workers act with their own copy
            assert not bool((_actions(next(batches)) == 1).all())
            assert pusher.lag(updates=7, batch=first) == 7  # acted with the weights of update 0
            pusher.after_batch(updates=5)  # pushed: every worker now picks action 1
            assert pusher.pushes == 1 and pusher.lag(updates=7) == 2
            for _ in range(2):
                batch = next(batches)
                assert bool((_actions(batch) == 1).all())
                assert pusher.lag(updates=7, batch=batch) == 2  # its steps carry the pushed version (5)
            policy.random_actions = True  # prefill switch: a buffer, so it travels with the push
            pusher.after_batch(updates=5, force=True)
            assert not bool((_actions(next(batches)) == 1).all())
    finally:
        shutdown_quietly(collector)
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_dreamer_with_two_process_workers_trains_resumes_and_keeps_streams_apart(tmp_runs, monkeypatch):
    original, threads = dreamer.run_owed_updates, []

    def record_threads(*a, **k):
        threads.append(torch.get_num_threads())
        return original(*a, **k)

    monkeypatch.setattr(dreamer, "run_owed_updates", record_threads)
    args = ["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "eval.every=0", "run.checkpoint_every=64",
            "collector.backend=process", "collector.num_workers=2", "replay.prefill=64"]
    run_dir = dreamer.main([*args, "train.env_steps=96"])
    first = load_checkpoint(run_dir)
    assert first["env_steps"] == 96 and first["updates"] > 0
    streams = first["replay"]["_storage"]["_storage"]["stream"]
    assert set(streams.tolist()) == {0, 1, 2, 3}  # 2 workers x 2 envs, one stream each
    rows = read_metrics(run_dir)
    assert rows[-1]["diag/weight_pushes"] >= 1 and "diag/policy_version_lag" in rows[-1]
    # the learner updates with the threads it asked for (threads=1), not what the collector left
    assert threads and set(threads) == {1}
    dreamer.main(["--resume", str(run_dir), "train.env_steps=160"])
    second = load_checkpoint(run_dir)
    assert second["env_steps"] == 160 and second["updates"] > first["updates"]
    streams = set(second["replay"]["_storage"]["_storage"]["stream"].tolist())
    assert {0, 1, 2, 3} < streams and streams - {0, 1, 2, 3} == {4, 5, 6, 7}  # new streams after resume
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_with_an_error_and_a_checkpoint(tmp_runs, monkeypatch):
    original = dreamer.run_owed_updates
    calls = []

    def kill_a_worker(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        return original(*args, **kwargs)

    monkeypatch.setattr(dreamer, "run_owed_updates", kill_a_worker)
    with pytest.raises(WorkerFailedError, match=r"collector worker \d \(pid \d+\) died \(killed by SIGKILL\)"):
        dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "eval.every=0",
                      "train.env_steps=100000", "collector.backend=process", "collector.num_workers=2"])
    (run_dir,) = (tmp_runs / "dreamer" / "CartPole-v1").iterdir()
    state = load_checkpoint(run_dir)
    assert state["env_steps"] >= 32 and state["updates"] > 0
    assert not multiprocessing.active_children()


# --- Ray -----------------------------------------------------------------------------------------

needs_ray = pytest.mark.skipif(not ray_available(), reason='Ray is an optional extra: pip install -e ".[ray]"')


@pytest.fixture
def ray_cluster(request):
    """A local 2-CPU Ray cluster, or (param "two_nodes") a simulated cluster of two 1-CPU nodes."""
    import ray

    if getattr(request, "param", "local") == "two_nodes":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        yield cluster.address
        ray.shutdown()
        cluster.shutdown()
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield "auto"
        ray.shutdown()


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("ray_cluster", ["local", "two_nodes"], indirect=True)
def test_dreamer_on_ray_actors_trains_with_finite_frames(tmp_runs, ray_cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    run_dir = dreamer.main(["--env", "cartpole", *DREAMER_TINY, f"run.root={tmp_runs}", "eval.every=0",
                            "train.env_steps=96", "replay.prefill=64", "collector.backend=ray",
                            "collector.num_workers=2", f"collector.ray_address={ray_cluster}"])
    state = load_checkpoint(run_dir)
    assert state["env_steps"] >= 96 and state["updates"] > 0
    assert set(state["replay"]["_storage"]["_storage"]["stream"].tolist()) == {0, 1, 2, 3}
    assert len(nodes) == (2 if ray_cluster != "auto" else 1)
