"""TSP and CVRP as batched TorchRL envs with action masks (``action_mask`` True = allowed).

Both envs step every instance of the batch at once (no Python loop over instances), accept any
problem size, emit rewards from ``step`` and keep the static instance data (coordinates,
demands) in the observation so a policy can encode it once per episode.

Keys (``B`` instances, ``N`` nodes; for CVRP node 0 is the depot and ``N = n_customers + 1``):

* ``locs`` ``[B, N, 2]`` float32 node coordinates (CVRP: depot first).
* ``current_node``, ``first_node`` ``[B, 1]`` int64 (``-1`` before the first TSP move).
* ``visited`` ``[B, N]`` bool; ``action_mask`` ``[B, N]`` bool.
* ``step_count`` ``[B, 1]`` int64; ``tour_length`` ``[B, 1]`` float64, the length so far (exact:
  computed in float64 from the float32 coordinates, like the dev sets' ``ref_cost``).
* CVRP only: ``demand`` ``[B, N]`` float32 (0 at the depot, in units of the capacity),
  ``remaining_capacity`` ``[B, 1]`` float32 (fraction of the vehicle's capacity left).
* ``action`` ``[B]`` int64: the next node. ``reward`` ``[B, 1]`` float32.

Rewards: ``reward_mode="dense"`` gives ``-length`` of each leg (the TSP closing leg is added to
the last step); ``"sparse"`` gives ``-tour length`` at the last step and 0 before. Both sum to
``-tour length``.

Episodes: TSP takes exactly ``N`` steps (the first picks the start node). CVRP starts at the
depot; a move to a customer needs its demand to fit the remaining capacity; depot-to-depot moves
are masked; the episode ends when every customer is served and the vehicle is back at the depot.

Instances come from a seeded generator (uniform coordinates in the unit square; CVRP demands
uniform in 1..9 with the capacity of Kool et al. 2019: 20 -> 30, 50 -> 40, 100 -> 50), or from
fixed tensors (``instances=``), e.g. :func:`load_dev_set` of a dev set bundled in ``envs/data``
(``load_dev_set("tsp20")``, see ``envs/data/README.md``); with fixed instances every reset returns the same ``B`` instances. ``instance_repeats=K`` makes each
generated instance appear ``K`` times in a row (``B / K`` distinct instances per reset), so a
learner can compare several rollouts of one instance (POMO-style shared baseline);
``symmetric_repeats=True`` gives copy ``j`` the ``j % 8``-th symmetry of the unit square (same
optimal tour length, different coordinates).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from importlib.resources import files
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = [
    "KOOL_CAPACITY",
    "InvalidActionError",
    "TSPEnv",
    "CVRPEnv",
    "generate_tsp",
    "generate_cvrp",
    "load_npz",
    "DevSetError",
    "BUNDLED_DEV_SETS",
    "dev_set_path",
    "load_dev_set",
    "tour_length",
    "square_symmetry",
    "SQUARE_SYMMETRIES",
]

KOOL_CAPACITY = {10: 20, 20: 30, 50: 40, 100: 50}


class InvalidActionError(ValueError):
    """An action chose a masked node."""


def _check_locs(locs: torch.Tensor, name: str = "locs") -> None:
    if locs.ndim != 3 or locs.shape[-1] != 2:
        raise ValueError(f"{name} must have shape [B, N, 2], got {tuple(locs.shape)}")
    bad = ~torch.isfinite(locs).all(-1).all(-1)
    if bad.any():
        raise ValueError(f"{name} has non-finite coordinates in instance(s) {bad.nonzero().flatten().tolist()[:10]}")


def generate_tsp(batch: int, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``{"locs": [batch, n, 2]}`` uniform in the unit square."""
    return {"locs": torch.rand(batch, n, 2, generator=generator)}


def generate_cvrp(
    batch: int, n_customers: int, generator: torch.Generator | None = None, capacity: int | None = None
) -> dict[str, torch.Tensor]:
    """Kool et al. (2019) CVRP: depot and customers uniform, integer demands 1..9, capacity by size."""
    if capacity is None:
        if n_customers not in KOOL_CAPACITY:
            raise ValueError(f"no standard capacity for {n_customers} customers; pass capacity= "
                             f"(known: {sorted(KOOL_CAPACITY)})")
        capacity = KOOL_CAPACITY[n_customers]
    return {
        "depot": torch.rand(batch, 2, generator=generator),
        "locs": torch.rand(batch, n_customers, 2, generator=generator),
        "demand": torch.randint(1, 10, (batch, n_customers), generator=generator).float(),
        "capacity": torch.full((batch,), float(capacity)),
    }


# the 8 symmetries of the unit square, (x, y) -> (x', y'); tour lengths are invariant under each
SQUARE_SYMMETRIES = [
    lambda x, y: (x, y), lambda x, y: (y, x), lambda x, y: (1 - x, y), lambda x, y: (y, 1 - x),
    lambda x, y: (x, 1 - y), lambda x, y: (1 - y, x), lambda x, y: (1 - x, 1 - y), lambda x, y: (1 - y, 1 - x),
]


def square_symmetry(xy: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of ``xy [B, ..., 2]`` mapped by the ``index[b] % 8``-th symmetry of the unit square
    (identity, transpose, mirrors, rotations); distances, hence tour lengths, are unchanged."""
    x, y = xy[..., 0], xy[..., 1]
    stacked = torch.stack([torch.stack(f(x, y), -1) for f in SQUARE_SYMMETRIES])  # [8, B, ..., 2]
    idx = (index.long() % 8).to(xy.device)
    return stacked[idx, torch.arange(xy.shape[0], device=xy.device)]


def load_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a routing ``.npz`` (TSP or CVRP dev-set format, see ``envs/data/README.md``) as tensors:
    the numeric arrays, CVRP ``demand`` as float32 and ``capacity`` repeated per instance. No checks;
    :func:`load_dev_set` resolves bundled names and validates the contents."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"routing data set not found: {path}")
    with np.load(path) as data:
        out = {k: torch.as_tensor(data[k]) for k in data.files if data[k].dtype.kind in "fiu"}
    if "demand" in out:
        out["demand"] = out["demand"].float()
        out["capacity"] = torch.full((out["locs"].shape[0],), float(out["capacity"]))
    return out


class DevSetError(ValueError):
    """A dev set that cannot be found or read, or that does not fit the problem or size asked for."""


# dev sets installed with the package (envs/data/<name>_dev.npz, described in envs/data/README.md)
BUNDLED_DEV_SETS = ("tsp20", "tsp50", "cvrp20", "cvrp50")
DEV_SET_KEYS = {"tsp": ("locs", "ref_cost"), "cvrp": ("depot", "locs", "demand", "capacity", "ref_cost")}


def _bundled_name(spec: str) -> str | None:
    """``tsp20``, ``tsp20_dev`` or ``tsp20_dev.npz`` -> ``tsp20``; None for anything else (a path)."""
    name = spec.removesuffix(".npz").removesuffix("_dev")
    return name if name in BUNDLED_DEV_SETS else None


def _dev_set_hint(problem: str | None, size: int | None) -> str:
    """What to put in ``env.dev_set`` instead: the bundled set for ``problem``/``size`` if there is one."""
    if problem is not None and f"{problem}{size}" in BUNDLED_DEV_SETS:
        return f"use env.dev_set={problem}{size}"
    names = [n for n in BUNDLED_DEV_SETS if problem is None or n.startswith(problem)]
    what = f"a {problem.upper()} .npz" if problem else "an .npz"
    what += f" of size {size}" if size else ""
    return f"use a bundled set ({', '.join(names)}) or {what} in the format of envs/data/README.md, or env.dev_set='' for no dev eval"


def dev_set_path(spec: str | os.PathLike) -> Path:
    """The file of a dev set: a bundled name (``tsp20``, ``tsp20_dev`` or ``tsp20_dev.npz``; see
    :data:`BUNDLED_DEV_SETS`) resolves to the copy installed with the package (``envs/data``), from
    any working directory; anything else is a path, absolute or relative to the current directory.
    Raises :class:`DevSetError` when the file does not exist."""
    given = os.fspath(spec)
    bundled = _bundled_name(given) if isinstance(given, str) else None
    if bundled is not None:
        path = Path(str(files("envs") / "data" / f"{bundled}_dev.npz"))
        if not path.is_file():
            raise DevSetError(f"bundled dev set '{given}' is missing from the installed package (expected {path}); "
                              f"reinstall the package (pip install .) or pass the path of the .npz")
        return path
    path = Path(given).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_file():
        where = "" if Path(given).is_absolute() else f" (looked in {path.parent})"
        raise DevSetError(f"dev set not found: {given}{where}; give one of the bundled names "
                          f"({', '.join(BUNDLED_DEV_SETS)}) or the path of an existing .npz (absolute or relative "
                          f"to the current directory) in the format of envs/data/README.md")
    return path


def load_dev_set(spec: str | os.PathLike, problem: str | None = None, size: int | None = None) -> dict[str, torch.Tensor]:
    """A dev set (bundled name or path, see :func:`dev_set_path`) as tensors, like :func:`load_npz`:
    the numeric arrays, CVRP ``demand`` as float32 and ``capacity`` repeated per instance.

    Checks the arrays a problem needs (:data:`DEV_SET_KEYS`) and their shapes; the problem is told by
    the keys (``depot``/``demand``/``capacity`` -> CVRP, else TSP). With ``problem`` and ``size``
    (nodes for TSP, customers for CVRP) the set must match them. Every failure is a one-line
    :class:`DevSetError` naming the file."""
    if problem is not None and problem not in DEV_SET_KEYS:
        raise DevSetError(f"problem must be tsp or cvrp, got '{problem}'")
    path = dev_set_path(spec)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
                raise ValueError("not an .npz (zip) archive")
        loaded = np.load(path, allow_pickle=False)
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as err:
        raise DevSetError(f"{path} cannot be read as a dev set .npz ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'corrupt file'})") from None
    keys = sorted(arrays)
    found = "cvrp" if {"depot", "demand", "capacity"} & set(keys) else "tsp"
    if problem is not None and problem != found:
        raise DevSetError(f"{path} is a {found.upper()} dev set (keys {', '.join(keys)}) but env.problem is {problem}; "
                          f"{_dev_set_hint(problem, size)}")
    required = DEV_SET_KEYS[found]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DevSetError(f"{path} lacks {', '.join(missing)}: a {found.upper()} dev set needs the keys "
                          f"{', '.join(required)} (found: {', '.join(keys) or 'none'}); see envs/data/README.md")
    bad_dtype = [k for k in required if arrays[k].dtype.kind not in "fiu"]
    if bad_dtype:
        raise DevSetError(f"{path}: {', '.join(bad_dtype)} must be numeric, got "
                          f"{', '.join(str(arrays[k].dtype) for k in bad_dtype)}")
    locs = arrays["locs"]
    if locs.ndim != 3 or locs.shape[-1] != 2 or locs.shape[0] == 0 or locs.shape[1] == 0:
        raise DevSetError(f"{path}: locs must have shape [instances, nodes, 2], got {list(locs.shape)}")
    n_inst, n = locs.shape[:2]
    unit = "nodes" if found == "tsp" else "customers"
    if size is not None and n != size:
        raise DevSetError(f"{path} has {n} {unit} per instance but env.size is {size}; "
                          f"{_dev_set_hint(problem or found, size)}")
    expected = {"ref_cost": (n_inst,)}
    if found == "cvrp":
        expected.update(depot=(n_inst, 2), demand=(n_inst, n))
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise DevSetError(f"{path}: {key} has shape {list(arrays[key].shape)} but locs holds {n_inst} instances "
                              f"of {n} {unit}, so {key} should have shape {list(shape)}")
    if found == "cvrp" and arrays["capacity"].shape not in ((), (n_inst,)):
        raise DevSetError(f"{path}: capacity must be a scalar or have shape [{n_inst}], "
                          f"got {list(arrays['capacity'].shape)}")
    out = {k: torch.as_tensor(v) for k, v in arrays.items() if v.dtype.kind in "fiu"}
    if found == "cvrp":
        out["demand"] = out["demand"].float()
        out["capacity"] = torch.as_tensor(arrays["capacity"], dtype=torch.float32).expand(n_inst).clone()
    return out


def tour_length(locs: torch.Tensor, tour: torch.Tensor, closed: bool = True) -> torch.Tensor:
    """Euclidean length in float64 of ``tour [B, L]`` (node indices) over ``locs [B, N, 2]``."""
    points = locs.double().gather(1, tour.unsqueeze(-1).expand(*tour.shape, 2))
    legs = (points[:, 1:] - points[:, :-1]).norm(dim=-1).sum(-1)
    if closed:
        legs = legs + (points[:, 0] - points[:, -1]).norm(dim=-1)
    return legs


class _RoutingEnv(EnvBase):
    """Shared machinery: specs, instance source, masked steps, rewards."""

    batch_locked = True

    def __init__(
        self,
        *,
        batch_size: int,
        num_nodes: int,
        reward_mode: Literal["dense", "sparse"],
        instances: dict[str, torch.Tensor] | None,
        device: str | torch.device,
        seed: int,
        instance_repeats: int = 1,
        symmetric_repeats: bool = False,
    ) -> None:
        if reward_mode not in ("dense", "sparse"):
            raise ValueError(f"reward_mode must be 'dense' or 'sparse', got '{reward_mode}'")
        if instance_repeats < 1 or batch_size % instance_repeats:
            raise ValueError(f"instance_repeats must be >= 1 and divide batch_size={batch_size}, got {instance_repeats}")
        if instance_repeats > 1 and instances is not None:
            raise ValueError("instance_repeats applies to generated instances, not to fixed ones")
        self.instance_repeats, self.symmetric_repeats = int(instance_repeats), bool(symmetric_repeats)
        super().__init__(device=device, batch_size=torch.Size([batch_size]))
        self.num_nodes = num_nodes
        self.reward_mode = reward_mode
        self.fixed_instances = None if instances is None else self._validate(instances)
        B, N = batch_size, num_nodes
        dev = self.device
        obs = {
            "locs": Unbounded(shape=(B, N, 2), device=dev),
            "current_node": Unbounded(shape=(B, 1), dtype=torch.int64, device=dev),
            "first_node": Unbounded(shape=(B, 1), dtype=torch.int64, device=dev),
            "visited": Binary(n=N, shape=(B, N), dtype=torch.bool, device=dev),
            "action_mask": Binary(n=N, shape=(B, N), dtype=torch.bool, device=dev),
            "step_count": Unbounded(shape=(B, 1), dtype=torch.int64, device=dev),
            "tour_length": Unbounded(shape=(B, 1), dtype=torch.float64, device=dev),
        }
        obs.update(self._extra_observation_specs(B, N))
        self.observation_spec = Composite(obs, shape=(B,), device=dev)
        self.action_spec = Categorical(N, shape=(B,), dtype=torch.int64, device=dev)
        self.reward_spec = Unbounded(shape=(B, 1), device=dev)
        self.done_spec = Composite(
            done=Categorical(2, shape=(B, 1), dtype=torch.bool, device=dev),
            terminated=Categorical(2, shape=(B, 1), dtype=torch.bool, device=dev),
            truncated=Categorical(2, shape=(B, 1), dtype=torch.bool, device=dev),
            shape=(B,),
            device=dev,
        )
        self.set_seed(seed)

    # --- subclass hooks ---
    def _validate(self, instances: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _extra_observation_specs(self, B: int, N: int) -> dict:
        return {}

    def _generate(self, n: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- common ---
    def _set_seed(self, seed: int | None) -> None:
        self._rng = torch.Generator().manual_seed(0 if seed is None else int(seed))

    def _new_instances(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Instances for the envs in ``mask`` (all tensors on the env device)."""
        n = int(mask.sum())
        if self.fixed_instances is not None:
            return {k: v[mask.cpu()].to(self.device) for k, v in self.fixed_instances.items()}
        k = self.instance_repeats
        if k == 1:
            return {key: v.to(self.device) for key, v in self._validate(self._generate(n)).items()}
        # groups of k copies; a partial reset draws whole groups and keeps the first n rows
        groups = self._validate(self._generate(-(-n // k)))
        out = {key: v.repeat_interleave(k, 0)[:n] for key, v in groups.items()}
        if self.symmetric_repeats:
            copy = torch.arange(n) % k
            for key in ("locs", "depot"):
                if key in out:
                    out[key] = square_symmetry(out[key], copy)
        return {key: v.to(self.device) for key, v in out.items()}

    def _leg(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Float64 distance between nodes ``a`` and ``b`` (``[B]`` each) of every instance."""
        idx = torch.arange(a.shape[0], device=self.device)
        pa = self._locs[idx, a].double()
        pb = self._locs[idx, b].double()
        return (pa - pb).norm(dim=-1, keepdim=True)

    def _check_action(self, action: torch.Tensor) -> torch.Tensor:
        action = action.reshape(self.batch_size).long()
        if ((action < 0) | (action >= self.num_nodes)).any():
            bad = ((action < 0) | (action >= self.num_nodes)).nonzero().flatten().tolist()
            raise InvalidActionError(f"action out of range [0, {self.num_nodes}) for instance(s) {bad[:10]}")
        mask = self._mask()
        allowed = mask.gather(1, action.unsqueeze(1)).squeeze(1) | self._done.squeeze(1)
        if not bool(allowed.all()):
            bad = (~allowed).nonzero().flatten().tolist()
            raise InvalidActionError(
                f"masked node chosen: instance {bad[0]} took node {int(action[bad[0]])} "
                f"(current node {int(self._current[bad[0]])}; {len(bad)} instance(s) affected: {bad[:10]})"
            )
        return action

    def _action_mask(self) -> torch.Tensor:
        """The legal moves; a finished instance allows only its current node (a no-op), so a
        masked softmax over a batch with finished rows never sees an all-False row. The action
        spec's mask is kept in sync, so ``rand_step``/``check_env_specs`` sample legal moves."""
        finished = torch.zeros_like(self._visited)
        finished.scatter_(1, self._current.clamp_min(0).unsqueeze(1), True)
        mask = torch.where(self._done, finished, self._mask())
        self.action_spec.update_mask(mask.clone())
        return mask

    def _reward(self, leg: torch.Tensor, finished_now: torch.Tensor) -> torch.Tensor:
        if self.reward_mode == "dense":
            return (-leg).float()
        return torch.where(finished_now, -self._length, torch.zeros_like(self._length)).float()


class TSPEnv(_RoutingEnv):
    """Batched TSP. See the module docstring for keys, rewards and episode rules.

    Args:
        num_nodes: nodes per instance (ignored if ``instances`` is given).
        batch_size: instances stepped together.
        reward_mode: ``"dense"`` (minus each leg) or ``"sparse"`` (minus the tour at the end).
        instances: fixed ``{"locs": [B, N, 2]}`` (e.g. from :func:`load_npz`).
        instance_repeats, symmetric_repeats: ``K`` consecutive copies of each generated instance
            (optionally under the unit square's symmetries); see the module docstring.
    """

    def __init__(
        self,
        num_nodes: int = 20,
        batch_size: int = 64,
        reward_mode: Literal["dense", "sparse"] = "dense",
        instances: dict[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        instance_repeats: int = 1,
        symmetric_repeats: bool = False,
    ) -> None:
        if instances is not None:
            _check_locs(torch.as_tensor(instances["locs"]))
            batch_size, num_nodes = instances["locs"].shape[:2]
        if num_nodes < 2:
            raise ValueError(f"TSP needs at least 2 nodes, got {num_nodes}")
        super().__init__(batch_size=batch_size, num_nodes=num_nodes, reward_mode=reward_mode,
                         instances=instances, device=device, seed=seed, instance_repeats=instance_repeats,
                         symmetric_repeats=symmetric_repeats)

    def _validate(self, instances):
        locs = torch.as_tensor(instances["locs"]).float()
        _check_locs(locs)
        if hasattr(self, "num_nodes") and locs.shape[1] != self.num_nodes:
            raise ValueError(f"locs has {locs.shape[1]} nodes, env has {self.num_nodes}")
        return {"locs": locs}

    def _generate(self, n):
        return generate_tsp(n, self.num_nodes, self._rng)

    def _mask(self) -> torch.Tensor:
        return ~self._visited

    def _observation(self) -> dict[str, torch.Tensor]:
        return {
            "locs": self._locs,
            "current_node": self._current.unsqueeze(1).clone(),
            "first_node": self._first.unsqueeze(1).clone(),
            "visited": self._visited.clone(),
            "action_mask": self._action_mask(),
            "step_count": self._steps.clone(),
            "tour_length": self._length.clone(),
        }

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        B, N = self.batch_size[0], self.num_nodes
        mask = torch.ones(B, dtype=torch.bool, device=self.device)
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(B)
        if not hasattr(self, "_locs"):
            self._locs = torch.zeros(B, N, 2, device=self.device)
            self._visited = torch.zeros(B, N, dtype=torch.bool, device=self.device)
            self._current = torch.full((B,), -1, dtype=torch.int64, device=self.device)
            self._first = torch.full((B,), -1, dtype=torch.int64, device=self.device)
            self._steps = torch.zeros(B, 1, dtype=torch.int64, device=self.device)
            self._length = torch.zeros(B, 1, dtype=torch.float64, device=self.device)
            self._done = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        if mask.any():
            self._locs = self._locs.clone()
            self._locs[mask] = self._new_instances(mask)["locs"]
            self._visited[mask] = False
            self._current[mask] = -1
            self._first[mask] = -1
            self._steps[mask] = 0
            self._length[mask] = 0.0
            self._done[mask] = False
        zeros = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        return TensorDict({**self._observation(), "done": self._done.clone(), "terminated": self._done.clone(),
                           "truncated": zeros}, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = self._check_action(tensordict.get("action"))
        active = ~self._done.squeeze(1)
        B = self.batch_size[0]
        idx = torch.arange(B, device=self.device)
        starting = self._current < 0
        leg = torch.where(starting.unsqueeze(1), torch.zeros_like(self._length),
                          self._leg(self._current.clamp_min(0), action))
        self._first = torch.where(starting & active, action, self._first)
        self._visited = self._visited.clone()
        self._visited[idx[active], action[active]] = True
        self._current = torch.where(active, action, self._current)
        finished_now = self._visited.all(1, keepdim=True) & active.unsqueeze(1)
        closing = self._leg(self._current, self._first.clamp_min(0))
        leg = torch.where(finished_now, leg + closing, leg) * active.unsqueeze(1)
        self._length = self._length + leg
        self._steps = self._steps + active.unsqueeze(1).long()
        self._done = self._done | finished_now
        reward = self._reward(leg, finished_now)
        zeros = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        return TensorDict({**self._observation(), "reward": reward, "done": self._done.clone(),
                           "terminated": self._done.clone(), "truncated": zeros},
                          batch_size=self.batch_size, device=self.device)


class CVRPEnv(_RoutingEnv):
    """Batched CVRP (node 0 = depot). See the module docstring for keys, rewards and rules.

    Args:
        num_customers: customers per instance (ignored if ``instances`` is given).
        batch_size: instances stepped together.
        capacity: vehicle capacity in demand units (default: Kool et al. by size).
        reward_mode: ``"dense"`` or ``"sparse"``.
        instances: fixed ``{"depot": [B, 2], "locs": [B, n, 2], "demand": [B, n],
            "capacity": [B]}`` (e.g. from :func:`load_npz`).
        instance_repeats, symmetric_repeats: as for :class:`TSPEnv`.
    """

    def __init__(
        self,
        num_customers: int = 20,
        batch_size: int = 64,
        capacity: int | None = None,
        reward_mode: Literal["dense", "sparse"] = "dense",
        instances: dict[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        instance_repeats: int = 1,
        symmetric_repeats: bool = False,
    ) -> None:
        if instances is not None:
            batch_size, num_customers = instances["locs"].shape[:2]
        if num_customers < 1:
            raise ValueError(f"CVRP needs at least 1 customer, got {num_customers}")
        self.num_customers = num_customers
        self.capacity = capacity
        super().__init__(batch_size=batch_size, num_nodes=num_customers + 1, reward_mode=reward_mode,
                         instances=instances, device=device, seed=seed, instance_repeats=instance_repeats,
                         symmetric_repeats=symmetric_repeats)

    def _extra_observation_specs(self, B, N):
        return {
            "demand": Bounded(low=0.0, high=1.0, shape=(B, N), device=self.device),
            "remaining_capacity": Bounded(low=0.0, high=1.0, shape=(B, 1), device=self.device),
        }

    def _validate(self, instances):
        missing = {"depot", "locs", "demand", "capacity"} - set(instances)
        if missing:
            raise ValueError(f"CVRP instances miss {sorted(missing)}")
        locs = torch.as_tensor(instances["locs"]).float()
        depot = torch.as_tensor(instances["depot"]).float()
        demand = torch.as_tensor(instances["demand"]).float()
        capacity = torch.as_tensor(instances["capacity"]).float().reshape(-1)
        _check_locs(locs)
        B, n = locs.shape[:2]
        if depot.shape != (B, 2):
            raise ValueError(f"depot must have shape [{B}, 2], got {tuple(depot.shape)}")
        _check_locs(depot.unsqueeze(1), "depot")
        if demand.shape != (B, n):
            raise ValueError(f"demand must have shape [{B}, {n}], got {tuple(demand.shape)}")
        if capacity.shape[0] == 1:
            capacity = capacity.expand(B)
        if capacity.shape != (B,):
            raise ValueError(f"capacity must be a scalar or have shape [{B}], got {tuple(capacity.shape)}")
        bad = (~torch.isfinite(demand).all(1)) | (demand <= 0).any(1) | (demand > capacity.unsqueeze(1)).any(1)
        if bad.any():
            raise ValueError(
                "invalid CVRP instance(s): every demand must be finite, > 0 and <= capacity; "
                f"failing instance(s): {bad.nonzero().flatten().tolist()[:10]}"
            )
        if hasattr(self, "num_customers") and n != self.num_customers:
            raise ValueError(f"instances have {n} customers, env has {self.num_customers}")
        return {"depot": depot, "locs": locs, "demand": demand, "capacity": capacity}

    def _generate(self, n):
        return generate_cvrp(n, self.num_customers, self._rng, self.capacity)

    def _mask(self) -> torch.Tensor:
        fits = self._demand <= self._remaining + 1e-6
        customers = ~self._visited & fits
        customers[:, 0] = False
        all_served = self._visited[:, 1:].all(1)
        at_depot = self._current == 0
        depot_ok = ~at_depot | all_served  # no depot -> depot unless finished
        mask = customers.clone()
        mask[:, 0] = depot_ok & ~(at_depot & all_served)
        return mask

    def _observation(self) -> dict[str, torch.Tensor]:
        return {
            "locs": self._locs,
            "current_node": self._current.unsqueeze(1).clone(),
            "first_node": torch.zeros_like(self._current).unsqueeze(1),
            "visited": self._visited.clone(),
            "action_mask": self._action_mask(),
            "step_count": self._steps.clone(),
            "tour_length": self._length.clone(),
            "demand": self._demand / self._capacity,
            "remaining_capacity": self._remaining / self._capacity,
        }

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        B, N = self.batch_size[0], self.num_nodes
        mask = torch.ones(B, dtype=torch.bool, device=self.device)
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(B)
        if not hasattr(self, "_locs"):
            self._locs = torch.zeros(B, N, 2, device=self.device)
            self._demand = torch.zeros(B, N, device=self.device)
            self._capacity = torch.ones(B, 1, device=self.device)
            self._remaining = torch.ones(B, 1, device=self.device)
            self._visited = torch.zeros(B, N, dtype=torch.bool, device=self.device)
            self._current = torch.zeros(B, dtype=torch.int64, device=self.device)
            self._steps = torch.zeros(B, 1, dtype=torch.int64, device=self.device)
            self._length = torch.zeros(B, 1, dtype=torch.float64, device=self.device)
            self._done = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        if mask.any():
            new = self._new_instances(mask)
            self._locs = self._locs.clone()
            self._locs[mask] = torch.cat([new["depot"].unsqueeze(1), new["locs"]], dim=1)
            self._demand = self._demand.clone()
            self._demand[mask] = torch.cat([torch.zeros_like(new["demand"][:, :1]), new["demand"]], dim=1)
            self._capacity[mask] = new["capacity"].unsqueeze(1)
            self._remaining[mask] = new["capacity"].unsqueeze(1)
            self._visited[mask] = False
            self._visited[mask, 0] = True  # the depot is never "to visit"
            self._current[mask] = 0
            self._steps[mask] = 0
            self._length[mask] = 0.0
            self._done[mask] = False
        zeros = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        return TensorDict({**self._observation(), "done": self._done.clone(), "terminated": self._done.clone(),
                           "truncated": zeros}, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = self._check_action(tensordict.get("action"))
        active = ~self._done.squeeze(1)
        B = self.batch_size[0]
        idx = torch.arange(B, device=self.device)
        leg = self._leg(self._current, action) * active.unsqueeze(1)
        to_depot = action == 0
        self._visited = self._visited.clone()
        self._visited[idx[active], action[active]] = True
        served = self._demand.gather(1, action.unsqueeze(1))
        self._remaining = torch.where(
            (to_depot & active).unsqueeze(1), self._capacity,
            torch.where(active.unsqueeze(1), self._remaining - served, self._remaining),
        )
        self._current = torch.where(active, action, self._current)
        self._length = self._length + leg
        self._steps = self._steps + active.unsqueeze(1).long()
        finished_now = (self._visited.all(1) & to_depot & active).unsqueeze(1)
        self._done = self._done | finished_now
        reward = self._reward(leg, finished_now)
        zeros = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        return TensorDict({**self._observation(), "reward": reward, "done": self._done.clone(),
                           "terminated": self._done.clone(), "truncated": zeros},
                          batch_size=self.batch_size, device=self.device)
