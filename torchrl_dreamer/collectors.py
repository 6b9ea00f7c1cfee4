"""Collection past one process, on TorchRL's own collectors: ``collector.backend=direct|process|ray``.

The ``collector`` config section maps onto :class:`torchrl.collectors.Collector` arguments:

* ``backend``: ``direct`` (the envs run in the learner's process: ``Collector``), ``process``
  (``num_workers`` worker processes: ``MultiSyncCollector`` / ``MultiAsyncCollector``) or ``ray``
  (``num_workers`` Ray actors: ``RayCollector``; ``pip install -e ".[ray]"``);
* ``sync``: wait for every worker before a batch (``True``), or take each worker's batch as it
  arrives (``False``; the learner never waits for the slowest worker, batches are more stale);
* ``worker_threads``: torch threads of each worker (``num_sub_threads``; a Ray actor also asks Ray
  for that many CPUs); the learner keeps its own thread count (TorchRL's multi-process collectors
  would otherwise lower it to the number of workers);
* ``weight_sync_every``: batches between two weight pushes to the workers;
* ``ray_address``: ``""`` starts a local Ray cluster, ``auto`` joins the one ``ray start`` runs,
  ``ray://host:port`` a remote one; ``ray_num_cpus`` caps the local cluster.

Rules the recipes follow (each one a measured trap of torchrl 0.14):

* workers act with a *separate CPU copy* of the policy, refreshed only by explicit weight pushes,
  never with the learner's parameters (a CPU learner's parameters would be moved to shared memory
  in place, and workers would read half-updated weights during an optimizer step);
* state the policy needs besides its weights (Dreamer's prefill switch) is a buffer, so it travels
  with the pushed weights;
* every worker's envs are tagged (:class:`~torchrl_dreamer.transforms.WorkerTag`), so a batch in any
  order maps onto stable per-env replay streams;
* ``total_frames`` is always finite (a Ray collector with ``-1`` yields nothing);
* the collector is always shut down, also on errors and Ctrl-C.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs import EnvBase

from .config import Choice, ConfigError, doc

__all__ = ["CollectorBackend", "CollectorConfig", "check_collector_config", "make_collector", "WeightPusher",
           "worker_chunks", "ray_available", "WorkerFailedError", "WorkerWatchdog", "keep_threads"]


class CollectorBackend(Choice):
    direct = "direct"
    process = "process"
    ray = "ray"


@dataclass
class CollectorConfig:
    backend: CollectorBackend = doc(CollectorBackend.direct, "direct (envs in the learner process), process (worker "
                                                             "processes) or ray (Ray actors, local or across nodes).")
    num_workers: int = doc(1, "process/ray: collector workers, each running env.num_envs envs (direct: must be 1).")
    sync: bool = doc(True, "process/ray: wait for every worker before each batch (false: take batches as they "
                           "come; more throughput, staler actions).")
    worker_threads: int = doc(1, "process/ray: torch threads per worker (a Ray actor also reserves that many CPUs).")
    weight_sync_every: int = doc(1, "process/ray: push the learner's weights to the workers every N batches.")
    ray_address: str = doc("", "ray: '' starts a local cluster, 'auto' joins the cluster `ray start` runs, "
                               "'ray://host:port' a remote one.")
    ray_num_cpus: int = doc(0, "ray with ray_address='': CPUs of the local cluster (0 = all).")


class WorkerFailedError(RuntimeError):
    """A collector worker died; the run stops with a checkpoint (continue it with ``--resume``)."""


class WorkerWatchdog:
    """Turns a dead collector worker process into :class:`WorkerFailedError` instead of a hang.

    torchrl 0.14.1 waits forever for a dead worker's acknowledgement of a weight push (and long for
    its batch). While active, a daemon thread checks every ``period`` seconds that every worker
    process lives. A death found while the learner waits on the collector (:meth:`waiting`: a batch,
    a weight push) interrupts that wait at once (a signal to the main thread); one found elsewhere is
    raised at the next wait. The learner's own state is never interrupted mid-update, so the caller
    can still write a consistent checkpoint. Ray actors are watched by Ray itself (a dead actor
    raises in the collector).
    """

    def __init__(self, collector: Any, period: float = 1.0) -> None:
        import threading

        self.procs = list(getattr(collector, "procs", None) or [])
        self.period = period
        self.failure: Optional[str] = None
        self._in_wait = False
        self._stop = threading.Event()
        self._thread: Any = None
        self._old_handler: Any = None

    def _dead(self) -> Optional[str]:
        import signal

        for index, proc in enumerate(self.procs):
            code = proc.exitcode
            if code is not None:
                how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                       else f"exit code {code}")
                return f"collector worker {index} (pid {proc.pid}) died ({how})"
        return None

    def _watch(self) -> None:
        import signal
        import threading

        main = threading.main_thread().ident
        while not self._stop.wait(self.period):
            failure = self._dead()
            if failure:
                self.failure = failure
                if self._in_wait and self._old_handler is not None:
                    signal.pthread_kill(main, signal.SIGUSR1)
                return

    def _on_signal(self, signum, frame) -> None:
        if self._in_wait and self.failure:
            raise WorkerFailedError(self.failure)

    def check(self) -> None:
        """Raises :class:`WorkerFailedError` if a worker is known to have died."""
        failure = self.failure or self._dead()
        if failure:
            self.failure = failure
            raise WorkerFailedError(failure)

    def waiting(self):
        """Context manager around a blocking call into the collector."""
        import contextlib

        @contextlib.contextmanager
        def _wait():
            self.check()
            self._in_wait = True
            try:
                yield
            finally:
                self._in_wait = False
            self.check()

        return _wait()

    def iterate(self, collector: Any) -> Iterator[TensorDictBase]:
        """``collector``'s batches, each wait watched."""
        it = iter(collector)
        while True:
            with self.waiting():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def __enter__(self) -> "WorkerWatchdog":
        import signal
        import threading

        if not self.procs:
            return self
        if hasattr(signal, "pthread_kill") and threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGUSR1, self._on_signal)
        self._thread = threading.Thread(target=self._watch, name="collector-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._old_handler is not None:
            signal.signal(signal.SIGUSR1, self._old_handler)
            self._old_handler = None


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def check_collector_config(cc: CollectorConfig) -> None:
    """The checks the type system cannot make (before any run directory exists)."""
    if cc.num_workers < 1:
        raise ConfigError(f"collector.num_workers must be >= 1, got {cc.num_workers}")
    if cc.worker_threads < 1:
        raise ConfigError(f"collector.worker_threads must be >= 1, got {cc.worker_threads}")
    if cc.weight_sync_every < 1:
        raise ConfigError(f"collector.weight_sync_every must be >= 1, got {cc.weight_sync_every}")
    if cc.ray_num_cpus < 0:
        raise ConfigError(f"collector.ray_num_cpus must be >= 0, got {cc.ray_num_cpus}")
    if cc.backend == "direct" and cc.num_workers != 1:
        raise ConfigError("collector.backend=direct runs the envs in the learner process: collector.num_workers must "
                          "be 1 (use collector.backend=process or ray for more workers)")
    if cc.backend == "ray" and not ray_available():
        raise ConfigError("collector.backend=ray needs Ray: pip install -e \".[ray]\" (or pip install 'ray>=2.60')")


def _worker_env(make_env: Callable[..., EnvBase], worker: int, threads: int) -> EnvBase:
    """Runs in the worker: its thread count, then its env tagged with its index."""
    from .transforms import WorkerTag

    torch.set_num_threads(threads)
    env = make_env(worker)
    env.append_transform(WorkerTag(worker))
    return env


def make_collector(cc: CollectorConfig, *, make_env: Callable[[int], EnvBase], policy: torch.nn.Module,
                   frames_per_worker: int, total_frames: int, device: str = "cpu", env: Optional[EnvBase] = None,
                   learner_threads: Optional[int] = None):
    """The collector of ``cc``.

    Args:
        make_env: ``make_env(worker)`` builds one worker's (batched) env; a picklable callable
            (module-level function or ``functools.partial``) for ``process``/``ray``.
        policy: the acting policy: the learner's own module for ``direct``, a separate CPU copy
            otherwise (see the module docstring).
        frames_per_worker: frames of one worker's batch (``num_envs x steps``).
        total_frames: finite frame budget of the collector (a multiple of the batch).
        env: ``direct`` only: the env already built (default ``make_env(0)``).
        learner_threads: torch threads the learner keeps (default: its current count).
    """
    from torchrl.collectors import Collector

    if total_frames <= 0:
        raise ValueError("total_frames must be finite and > 0")
    common = dict(total_frames=total_frames, storing_device="cpu", env_device="cpu",
                  auto_register_policy_transforms=False)  # the recipes add InitTracker + primers themselves
    if cc.backend == "direct":
        return Collector(env if env is not None else make_env(0), policy, frames_per_batch=frames_per_worker,
                         policy_device=device, **common)
    W = cc.num_workers
    factories = [functools.partial(_worker_env, make_env, w, cc.worker_threads) for w in range(W)]
    frames = frames_per_worker * W if cc.sync else frames_per_worker
    threads = learner_threads or torch.get_num_threads()
    if cc.backend == "process":
        collector = Collector(factories, policy, backend="process", num_collectors=W, sync=cc.sync,
                              frames_per_batch=frames, policy_device="cpu", num_threads=threads,
                              num_sub_threads=cc.worker_threads, **common)
        keep_threads(threads)  # see keep_threads
        return collector
    # ray: one single-process collector per actor, each asking Ray for its CPUs
    init = {"address": cc.ray_address} if cc.ray_address else {}
    if not cc.ray_address and cc.ray_num_cpus:
        init["num_cpus"] = cc.ray_num_cpus
    inner = {"auto_register_policy_transforms": common.pop("auto_register_policy_transforms")}
    # Weights go through Ray's object store (WeightPusher): torchrl 0.14.1's default RayWeightSyncScheme
    # builds a gloo group with the actors whose rendezvous timed out here (60 s) on every push. Without
    # a scheme, TorchRL warns at the first batch that none was initialised: expected, so silenced.
    import warnings

    warnings.filterwarnings("ignore", message="RayCollector iteration started before weight synchronization")
    return Collector(factories, policy, backend="ray", num_collectors=W, sync=cc.sync, frames_per_batch=frames,
                     policy_device="cpu",
                     backend_options={"ray_init_config": init, "remote_configs": {"num_cpus": cc.worker_threads},
                                      "collector_kwargs": inner, "weight_sync_schemes": {}},
                     **common)


def acting_copy(policy: torch.nn.Module, cc: CollectorConfig) -> torch.nn.Module:
    """What the workers act with: the learner's module itself for ``direct``, else a CPU copy."""
    import copy

    if cc.backend == "direct":
        return policy
    acting = copy.deepcopy(policy).to("cpu")
    if hasattr(acting, "report_version"):
        acting.report_version = True  # batches say which push their actions came from
    return acting


class WeightPusher:
    """Sends the learner's weights (and buffers) to the workers every ``weight_sync_every`` batches
    and counts how stale the acting weights are (``lag()``: learner updates since the last push)."""

    def __init__(self, collector, policy: torch.nn.Module, cc: CollectorConfig,
                 watchdog: Optional[WorkerWatchdog] = None) -> None:
        self.collector, self.policy, self.cc, self.watchdog = collector, policy, cc, watchdog
        self.batches = 0
        self.pushed_at = 0
        self.pushes = 0

    def initial_push(self) -> None:
        """The first push, before iterating: Ray workers join the weight-sync group while idle (a first
        push in the middle of a Ray collection waits for them and times out)."""
        if self.cc.backend != "direct":
            self._push(self.pushed_at)

    def _push(self, updates: int) -> None:
        version = getattr(self.policy, "policy_version", None)
        if isinstance(version, torch.Tensor):
            version.fill_(updates)  # travels with the weights: the workers' steps report it
        weights = TensorDict.from_module(self.policy).data.to("cpu")
        if self.cc.backend == "ray":  # one object in Ray's store, read by every actor's collector
            import ray

            ref = ray.put(weights)
            ray.get([c.update_policy_weights_.remote(ref) for c in self.collector.remote_collectors])
        elif self.watchdog is not None:
            with self.watchdog.waiting():  # a dead worker would never acknowledge the push
                self.collector.update_policy_weights_(weights)
        else:
            self.collector.update_policy_weights_(weights)
        self.pushed_at, self.pushes = updates, self.pushes + 1

    def after_batch(self, updates: int, *, force: bool = False) -> None:
        """Call once per received batch, after the updates it paid for (``force``: push now, e.g.
        when the prefill switch flips)."""
        self.batches += 1
        if self.cc.backend == "direct":
            self.pushed_at = updates  # the workers are the learner
            return
        if force or self.batches % self.cc.weight_sync_every == 0:
            self._push(updates)

    def lag(self, updates: int, batch: Optional[TensorDictBase] = None) -> float:
        """Learner updates since the weights behind ``batch``'s actions (mean over its steps; they
        carry ``policy_version`` from :func:`acting_copy`), else since the last push."""
        if batch is not None and "policy_version" in batch.keys():
            return float(updates - batch.get("policy_version").float().mean())
        return float(updates - self.pushed_at)


def worker_chunks(batch: TensorDictBase, envs_per_worker: int, key: str = "worker") -> Iterator[tuple[int, TensorDictBase]]:
    """Splits a collector batch into ``(worker, [envs_per_worker, T] batch)`` chunks, whatever the
    collector's layout (``[E, T]``, ``[W, E, T]`` stacked, ``[W*E, T]`` concatenated); a batch
    without the :class:`~torchrl_dreamer.transforms.WorkerTag` key is worker 0's."""
    T = batch.batch_size[-1]
    flat = batch.reshape(-1, T) if batch.batch_dims > 1 else batch.reshape(1, T)
    E = envs_per_worker
    if flat.batch_size[0] % E:
        raise ValueError(f"a batch of {flat.batch_size[0]} env streams does not split into workers of {E} envs")
    for start in range(0, flat.batch_size[0], E):
        chunk = flat[start:start + E]
        if key in chunk.keys():
            tags = chunk.get(key).reshape(-1)
            worker = int(tags[0])
            if not bool((tags == worker).all()):
                raise ValueError("a batch chunk mixes the envs of several collector workers")
        else:
            worker = 0
        yield worker, chunk


def keep_threads(threads: int) -> int:
    """Puts the learner's torch thread count back to ``threads`` (returns it). torchrl 0.14.1's process
    collectors change the parent's count (to 2 instead of the 1 asked, here, once the workers run),
    which made each Dreamer update 4-15x slower on a busy 2-core machine; the recipes call this
    after every batch (a no-op when nothing changed it)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def finite_frames(remaining_steps: int, batch_frames: int, slack_batches: int = 2) -> int:
    """A finite ``total_frames`` covering ``remaining_steps`` (a multiple of the batch, with slack so
    that an async collector's last batches are not cut short)."""
    return batch_frames * (math.ceil(max(remaining_steps, 1) / batch_frames) + slack_batches)


def describe(cc: CollectorConfig, envs_per_worker: int) -> str:
    if cc.backend == "direct":
        return f"collector: direct, {envs_per_worker} envs in the learner process"
    return (f"collector: {cc.backend}, {cc.num_workers} workers x {envs_per_worker} envs, "
            f"{'sync' if cc.sync else 'async'}, {cc.worker_threads} thread(s) per worker, weights pushed every "
            f"{cc.weight_sync_every} batch(es)")


def shutdown_quietly(collector: Any) -> None:
    """``collector.shutdown()`` that never raises (it runs in ``finally`` blocks, after another error)."""
    if collector is None:
        return
    import sys

    try:
        collector.shutdown()
    except Exception as exc:  # noqa: BLE001 - the first error is the one to report
        print(f"warning: collector shutdown: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    # torchrl 0.14.1: a multi-process collector's shutdown leaves its weight-sync schemes to the garbage
    # collector, whose shutdown then starts a queue thread while the interpreter exits and hangs it
    # forever (seen when a run failed before its first weight push). Shut them down here, while alive.
    for scheme in (getattr(collector, "_weight_sync_schemes", None) or {}).values():
        try:
            scheme.shutdown()
        except Exception as exc:  # noqa: BLE001
            print(f"warning: weight-sync shutdown: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


