"""Data-parallel learners under ``torchrun``: PyTorch's own process group, nothing home-made.

Run any recipe that supports it (routing PPO, MAPPO) with ``torchrun`` instead of ``python -m``::

    torchrun --standalone --nproc_per_node=2 -m recipes.ppo_routing --env tsp20
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=4 \\
        -m recipes.mappo_vmas --env navigation

The recipe sees ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (set by ``torchrun``) and joins the process
group itself; there is no extra flag. Each rank collects its own share of the batch (its own
instances or VMAS envs, seeded with ``seed + rank``), the gradients of every minibatch step are
all-reduced before clipping and the optimizer step, so all ranks keep identical weights; rank 0
alone evaluates, logs and writes checkpoints, and the time-budget decision is rank 0's, broadcast to
every rank so none waits forever. The batch sizes in the config are the *global* ones: two ranks
on half batches take the same optimizer step as one process on the whole batch.

Backends: ``gloo`` for CPU learners, ``nccl`` when ``device=cuda`` (each rank then uses
``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

__all__ = ["DataParallel", "data_parallel", "rank_device", "rank_config", "shutdown"]


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel group (``world_size == 1``: a plain single process,
    every method is then a cheap no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"  # where collectives run: cpu (gloo) or cuda:LOCAL_RANK (nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, logs and writes checkpoints."""
        return self.rank == 0

    def shard(self, total: int, what: str) -> int:
        """This rank's share of a global count (``total`` must split evenly; ``what`` names the
        config key in the error)."""
        if total % self.world_size:
            from .config import ConfigError

            raise ConfigError(f"{what}={total} does not split over {self.world_size} data-parallel ranks; "
                              f"use a multiple of {self.world_size}")
        return total // self.world_size

    # --- collectives (all ranks must call them in the same order) ----------------------------------

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (a new tensor; autograd does not flow through it)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().to(self.comm_device, copy=True)
        torch.distributed.all_reduce(out)
        return out.to(tensor.device)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world_size if self.enabled else tensor

    def sync_gradients(self, params: Sequence[torch.Tensor], *, average: bool) -> None:
        """All-reduces the gradients of ``params`` in one flat buffer (sum, or mean with ``average``).
        A parameter without a gradient on this rank contributes zeros, so every rank sends the same
        layout."""
        if not self.enabled or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
        # one collective: the gradients and, at the end, which parameters have one on any rank (a
        # parameter no rank touched keeps grad None, so Adam skips it as in one process)
        flat = torch.cat([*(g.reshape(-1) for g in grads), has_grad.to(grads[0].dtype)]).to(self.comm_device)
        torch.distributed.all_reduce(flat)
        flat = flat.to(params[0].device)
        touched = flat[-len(params):] > 0
        if average:
            flat /= self.world_size
        offset = 0
        for p, keep in zip(params, touched.tolist()):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if keep else None
            offset += n

    def broadcast_module(self, *modules: torch.nn.Module) -> None:
        """Copies rank 0's parameters and buffers into every rank's ``modules``."""
        if not self.enabled:
            return
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                buffer = tensor.data.to(self.comm_device)
                torch.distributed.broadcast(buffer, src=0)
                tensor.data.copy_(buffer)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. the time-budget stop)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device)
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


SINGLE = DataParallel()
_current: DataParallel | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        from .config import ConfigError

        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def data_parallel(device: str = "cpu") -> DataParallel:
    """The data-parallel group of this process: joins it on first call when ``torchrun`` (or any
    launcher setting ``WORLD_SIZE > 1``, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``) started it, else
    :data:`SINGLE`. ``device``: ``cuda...`` uses NCCL, anything else gloo."""
    global _current
    if _current is not None:
        return _current
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        _current = SINGLE
        return _current
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = str(device).startswith("cuda")
    dp = DataParallel(rank=_env_int("RANK", 0), world_size=world, local_rank=local_rank,
                      comm_device=f"cuda:{local_rank}" if cuda else "cpu")
    if not torch.distributed.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("TORCHRL_DREAMER_DIST_TIMEOUT_S", 1800)))
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    _current = dp
    return dp


def rank_device(device: str, dp: DataParallel) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under ``torchrun`` (one GPU per rank); anything else unchanged."""
    if dp.enabled and device == "cuda":
        return f"cuda:{dp.local_rank}"
    return device


def rank_config(cfg: Any, dp: DataParallel, keys: Sequence[str]) -> Any:
    """This rank's copy of a recipe config: each dotted ``key`` (a global count, e.g.
    ``"ppo.batch_instances"``) divided by the world size, ``device=cuda`` as ``cuda:LOCAL_RANK``;
    ``cfg`` itself in one process. A count that does not split is a :class:`ConfigError`."""
    if not dp.enabled:
        return cfg
    import copy

    local = copy.deepcopy(cfg)
    for key in keys:
        *path, name = key.split(".")
        section = local
        for part in path:
            section = getattr(section, part)
        setattr(section, name, dp.shard(getattr(section, name), key))
    if hasattr(local, "device"):
        local.device = rank_device(local.device, dp)
    return local


def shutdown() -> None:
    """Leaves the process group (end of a run; safe to call more than once)."""
    global _current
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = None


def total_count(dp: DataParallel, values: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The sums over ranks of several scalars with one all-reduce."""
    values = list(values)
    if not dp.enabled or not values:
        return values
    summed = dp.sum(torch.stack([v.detach().reshape(()).float() for v in values]))
    return list(summed.unbind())
