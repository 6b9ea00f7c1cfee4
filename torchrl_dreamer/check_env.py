"""The env contract: what a TorchRL env needs for each algorithm, checked before any training.

    python -m torchrl_dreamer.check_env mypkg.myenv:make_env                 # every algorithm
    python -m torchrl_dreamer.check_env mypkg.myenv:make_env --algo dreamer --kwargs '{"size": 7}'
    python -m torchrl_dreamer.check_env envs.goal_reaching:make_env --algo mappo

The env is built exactly as the recipes build it: ``function(num_envs=..., max_steps=0,
device=..., seed=..., **kwargs)``. Then, per algorithm:

* **dreamer / ppo** (single agent): observations at the root (``env.obs_keys``; default
  ``observation``, float vectors ``[F]`` or uint8 pixels ``[3, 64, 64]`` for Dreamer), a float
  ``reward`` ``[*B, 1]`` at the root, bool ``done`` and ``terminated`` flags, a ``Categorical`` or
  ``OneHot`` (discrete) or ``Bounded`` (continuous) ``action``, an optional boolean
  ``action_mask`` ``[*B, n_actions]`` (True = allowed; discrete actions only), and a batch size of
  ``[num_envs]`` (or ``[]`` for one env).
* **mappo** (multi-agent): one or more agent groups with ``(<group>, "observation")``,
  ``(<group>, "reward")`` and a ``Bounded`` ``(<group>, "action")``.

Then TorchRL's ``check_env_specs`` runs a short rollout (through TorchRL's ``ActionMask`` when the
env has a mask, so random actions respect it) and the checker confirms that ``step`` writes the
reward and the done flags with the declared shapes. Every problem is printed on one line, with
its fix; exit status 0 when the env fits the asked algorithm (``--algo all``, the default: at
least one of them; the last line says which), 1 otherwise (2: bad arguments).
The recipes run the same checks at start-up on a factory env (one ``error:`` line, exit 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["EnvProblem", "env_problems", "check_factory", "ALGOS", "main"]

ALGOS = ("dreamer", "ppo", "mappo")
SINGLE_AGENT = ("dreamer", "ppo")


@dataclass(frozen=True)
class EnvProblem:
    """One broken part of the contract: ``what`` is wrong and how to ``fix`` it."""

    name: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.name}] {self.what}; fix: {self.fix}"


def _key_str(key) -> str:
    return key if isinstance(key, str) else "/".join(key)


def _leaf_keys(spec) -> list:
    return list(spec.keys(include_nested=True, leaves_only=True))


def _spec_problems(env, algo: str, obs_keys: Sequence[str], mask_key: str, num_envs: int,
                   pixels_ok: bool) -> list[EnvProblem]:
    from torchrl.data import Bounded, Categorical, OneHot

    problems: list[EnvProblem] = []
    add = lambda *a: problems.append(EnvProblem(*a))  # noqa: E731
    batch = tuple(env.batch_size)
    if batch not in ((num_envs,), ()) or (batch == () and num_envs > 1):
        add("batch", f"the env's batch_size is {list(batch)} but the recipe asked for num_envs={num_envs}",
            "return an env batched over num_envs (batch_size=[num_envs]), e.g. torchrl.envs.SerialEnv(num_envs, "
            "make_one)")
    reward_keys = [k if isinstance(k, tuple) else (k,) for k in env.reward_keys]
    multi_agent = any(len(k) > 1 for k in reward_keys)
    if not reward_keys:
        add("reward", "the env declares no reward (reward_spec is empty)",
            "declare self.reward_spec = Unbounded(shape=(*batch_size, 1)) and write 'reward' in _step")
    if algo in SINGLE_AGENT and multi_agent:
        add("agents", f"rewards live under agent groups ({', '.join(_key_str(k) for k in reward_keys)}): a "
            f"multi-agent env, which {algo} does not train",
            "train it with MAPPO (python -m recipes.mappo_vmas --env custom env.factory=...), or expose one root "
            "'reward' and 'observation' for a single agent")
        return problems
    if algo == "mappo":
        if reward_keys and not multi_agent:
            add("agents", "the env has a root 'reward' and no agent group: a single-agent env, which MAPPO does not "
                "train", "train it with --algo dreamer or ppo (python -m recipes.dreamer --env custom "
                "env.factory=...), or nest keys under a group, e.g. ('agents', 'reward') [*B, n_agents, 1]")
            return problems
        for rk in reward_keys:
            group = rk[:-1]
            if rk[-1] != "reward":
                add("reward_key", f"the agent reward is named '{_key_str(rk)}', not '{_key_str((*group, 'reward'))}'",
                    "name it (<group>, 'reward') (or rename it with torchrl.envs.RenameTransform)")
            obs_key, act_key = (*group, "observation"), (*group, "action")
            if obs_key not in _leaf_keys(env.observation_spec):
                add("observation", f"agent group '{_key_str(group)}' has no {_key_str(obs_key)} observation",
                    f"write {_key_str(obs_key)} [*B, n_agents, F] in _reset and _step")
            act = env.full_action_spec.get(act_key, None) if act_key in _leaf_keys(env.full_action_spec) else None
            if act is None:
                add("action", f"agent group '{_key_str(group)}' has no {_key_str(act_key)} action spec",
                    f"declare {_key_str(act_key)} as Bounded(low, high, shape=(*B, n_agents, A))")
            elif not isinstance(act, Bounded):
                add("action_kind", f"MAPPO needs continuous Bounded agent actions; {_key_str(act_key)} is "
                    f"{type(act).__name__}", "declare a Bounded box action (discrete MAPPO is not provided)")
        return problems

    # single agent: observations
    spec = env.observation_spec
    present = [_key_str(k) for k in _leaf_keys(spec)]
    for key in obs_keys:
        if key not in spec.keys():
            add("observation_key", f"observation key '{key}' is not in the env's observation spec (it has: "
                f"{', '.join(present) or 'nothing'})",
                f"name the observation '{key}' in the env, or set env.obs_keys=[<your key>]")
            continue
        leaf = spec[key]
        shape = tuple(leaf.shape[len(batch):])
        if leaf.dtype == torch.uint8 and len(shape) == 3:
            if algo == "dreamer" and not pixels_ok and shape[0] != 3:
                add("pixels_shape", f"pixel observation '{key}' is {list(shape)}; Dreamer's image encoder takes "
                    "[3, 64, 64] uint8", "resize/permute in the env, or use env.pixels=true with a Gymnasium id")
        elif not leaf.dtype.is_floating_point:
            add("observation_dtype", f"observation '{key}' has dtype {leaf.dtype}; the networks take float "
                "vectors (or uint8 [3, 64, 64] images)",
                f"emit float32, or cast with torchrl.envs.DTypeCastTransform(dtype_in={leaf.dtype}, "
                f"dtype_out=torch.float32, in_keys=['{key}'])")
        elif len(shape) != 1 and algo == "dreamer":
            add("observation_shape", f"observation '{key}' is {list(shape)} per env; Dreamer encodes vectors [F] "
                "or [3, 64, 64] images", "flatten it in the env (torchrl.envs.FlattenObservation)")
    # reward and done
    if reward_keys:
        reward = env.full_reward_spec[reward_keys[0]] if len(reward_keys[0]) == 1 else None
        if reward is not None and not reward.dtype.is_floating_point:
            add("reward_dtype", f"reward has dtype {reward.dtype}", "declare and write a float32 reward")
        if reward_keys[0] != ("reward",):
            add("reward_key", f"the reward is named '{_key_str(reward_keys[0])}', not 'reward'",
                "name the root reward 'reward' (or rename it with torchrl.envs.RenameTransform)")
    done_keys = [_key_str(k) for k in env.done_keys]
    for flag in ("done", "terminated"):
        if flag not in done_keys:
            add("done", f"the env declares no '{flag}' flag (done flags: {', '.join(done_keys) or 'none'})",
                "declare done_spec with bool 'done', 'terminated' (and 'truncated') of shape [*B, 1]")
    for key in env.done_keys:
        if env.full_done_spec[key].dtype != torch.bool:
            add("done_dtype", f"done flag '{_key_str(key)}' has dtype {env.full_done_spec[key].dtype}",
                "declare done flags as Categorical(2, dtype=torch.bool)")
    # actions and mask
    action = env.full_action_spec
    action_keys = _leaf_keys(action)
    if action_keys != ["action"]:
        add("action_key", f"the env's action keys are {[_key_str(k) for k in action_keys]}; the single-agent "
            "recipes write one root 'action'", "declare one action spec named 'action'")
        return problems
    act = action["action"]
    n_actions = None
    if isinstance(act, (Categorical, OneHot)):
        n_actions = int(act.space.n)
    elif isinstance(act, Bounded):
        if not (torch.isfinite(act.space.low).all() and torch.isfinite(act.space.high).all()):
            add("action_bounds", "the Bounded action has infinite bounds", "give finite low/high")
    else:
        add("action_kind", f"the action spec is {type(act).__name__}; the recipes take Categorical or OneHot "
            "(discrete) or Bounded (continuous) actions", "declare one of those kinds")
    if mask_key and mask_key in spec.keys():
        mask = spec[mask_key]
        shape = list(mask.shape[len(batch):])
        if n_actions is None:
            add("mask_actions", f"'{mask_key}' is observed but the actions are not discrete",
                "drop the mask, or set env.mask_key='' to ignore it")
        elif shape != [n_actions]:
            add("mask_shape", f"'{mask_key}' has shape {shape} per env; expected [{n_actions}] (one entry per action)",
                f"emit a bool mask of shape [*batch_size, {n_actions}]")
        if mask.dtype != torch.bool:
            add("mask_dtype", f"'{mask_key}' has dtype {mask.dtype}; expected bool (True = allowed)",
                "declare it as Binary(n, dtype=torch.bool) and emit bool")
    return problems


def _rollout_problems(env, mask_key: str) -> list[EnvProblem]:
    """``check_env_specs`` and what ``step`` writes, on a few steps with random (mask-respecting) actions."""
    from torchrl.data import Categorical, OneHot
    from torchrl.envs import ActionMask, TransformedEnv
    from torchrl.envs.utils import check_env_specs

    problems: list[EnvProblem] = []
    act = env.full_action_spec.get("action", None) if "action" in env.full_action_spec.keys() else None
    masked = bool(mask_key) and mask_key in env.observation_spec.keys() and isinstance(act, (Categorical, OneHot))
    probe = TransformedEnv(env, ActionMask(action_key="action", mask_key=mask_key)) if masked else env
    import logging

    torchrl_log = logging.getLogger("torchrl")
    level = torchrl_log.level
    torchrl_log.setLevel(logging.WARNING)  # its "check_env_specs succeeded!" is not ours to print
    try:
        check_env_specs(probe, seed=0)
        rollout = probe.rollout(3, break_when_any_done=False)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's env is reported, not raised
        text = [line.strip(" -") for line in str(exc).strip().splitlines() if line.strip(" -")]
        first = " ".join(text)  # one line, with the details TorchRL lists below its first line
        if "masked action" in first and not masked:
            fix = "publish the mask as a bool 'action_mask' observation (or name it with env.mask_key)"
        else:
            fix = ("make _reset/_step return exactly the declared keys, shapes and dtypes (an action spec must match "
                   "what _step reads: Categorical = an index [*B], OneHot = [*B, n])")
        problems.append(EnvProblem("rollout", f"a short rollout with the spec's own random actions failed: "
                                   f"{type(exc).__name__}: {first[:300]}", fix))
        return problems
    finally:
        torchrl_log.setLevel(level)
    # what _step itself returns (EnvBase.step fills a missing done flag with False: episodes that never end)
    try:
        td = probe.rand_action(probe.reset())
        raw = env._step(td.clone())
        written = set(raw.keys(True, True))
    except Exception:  # noqa: BLE001 - a wrapped env may not expose a raw _step; the rollout above passed
        written = None
    for key in (env.reward_keys if written is not None else []):
        if ((key,) if isinstance(key, str) else tuple(key)) not in {(k,) if isinstance(k, str) else k for k in written}:
            problems.append(EnvProblem("reward_written", f"_step does not write '{_key_str(key)}'",
                                       "return the reward from _step"))
    for flag in (("done", "terminated") if written is not None else ()):
        if flag not in written:
            problems.append(EnvProblem("done", f"_step does not write '{flag}' (TorchRL fills it with False, so "
                                       "episodes would never end)",
                                       "return bool 'done' and 'terminated' (and 'truncated') [*B, 1] from _step"))
    reward = rollout.get(("next", "reward"), None)
    if reward is not None and not bool(torch.isfinite(reward.float()).all()):
        problems.append(EnvProblem("reward_finite", "step wrote a non-finite reward", "keep rewards finite"))
    return problems


def env_problems(env, algo: str, *, obs_keys: Sequence[str] = ("observation",), mask_key: str = "action_mask",
                 num_envs: int | None = None, rollout: bool = True, pixels_ok: bool = False) -> list[EnvProblem]:
    """Every way ``env`` breaks ``algo``'s contract (empty list: it fits). ``rollout=False`` skips
    the rollout checks (specs only)."""
    from torchrl.envs import EnvBase

    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got '{algo}'")
    if not isinstance(env, EnvBase):
        kind = f"{type(env).__module__}.{type(env).__name__}"
        fix = ("wrap it: torchrl.envs.GymWrapper(env) (or return torchrl.envs.GymEnv(id) batched with SerialEnv)"
               if "gym" in kind.lower() else "return a torchrl.envs.EnvBase")
        return [EnvProblem("not_torchrl", f"the factory returned {kind}, not a TorchRL EnvBase", fix)]
    n = num_envs if num_envs is not None else max(1, env.batch_size.numel())
    problems = _spec_problems(env, algo, list(obs_keys), mask_key, n, pixels_ok)
    if rollout and not any(p.name in ("agents", "action_key", "observation_key") for p in problems):
        problems += _rollout_problems(env, mask_key if algo in SINGLE_AGENT else "")
    return problems


def check_factory(factory: str, algo: str, *, num_envs: int = 2, kwargs: dict[str, Any] | None = None,
                  obs_keys: Sequence[str] = ("observation",), mask_key: str = "action_mask", device: str = "cpu",
                  seed: int = 0, max_steps: int = 0) -> list[EnvProblem]:
    """Builds ``factory`` the way the recipes do and returns :func:`env_problems` (a factory that
    cannot be imported or called is one problem)."""
    from .envs import EnvFactoryError, resolve_factory

    try:
        fn = resolve_factory(factory)
    except EnvFactoryError as exc:
        return [EnvProblem("factory", str(exc), "check the 'package.module:function' spelling and PYTHONPATH")]
    call_kwargs = {"num_envs": num_envs, "max_steps": max_steps, "device": device, "seed": seed, **dict(kwargs or {})}
    try:
        env = fn(**call_kwargs)
    except Exception as exc:  # noqa: BLE001
        args = ", ".join(f"{k}={v!r}" for k, v in call_kwargs.items())
        first = (str(exc).strip().splitlines() or [""])[0]
        return [EnvProblem("factory_call", f"{factory.partition(':')[2]}({args}) raised {type(exc).__name__}: {first}",
                           "accept the keyword arguments num_envs, max_steps (0 = the env's own limit), device, "
                           "seed and your env.kwargs")]
    try:
        return env_problems(env, algo, obs_keys=obs_keys, mask_key=mask_key, num_envs=num_envs)
    finally:
        close = getattr(env, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing a broken env must not hide its problems
                pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchrl_dreamer.check_env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("factory", help="'package.module:function' returning a TorchRL EnvBase")
    parser.add_argument("--algo", choices=(*ALGOS, "all"), default="all", help="algorithm(s) to check for (default all)")
    parser.add_argument("--num-envs", type=int, default=2, help="num_envs to build the env with (default 2)")
    parser.add_argument("--max-steps", type=int, default=0, help="max_steps passed to the factory (0 = the env's own "
                        "limit, as the single-agent recipes' default)")
    parser.add_argument("--kwargs", default="{}", help="JSON object of env.kwargs, e.g. '{\"size\": 7}'")
    parser.add_argument("--obs-keys", nargs="+", default=["observation"], help="observation keys (single agent)")
    parser.add_argument("--mask-key", default="action_mask", help="action-mask key ('' = none)")
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        print(f"error: --kwargs must be a JSON object ({exc})", file=sys.stderr)
        return 2
    algos = ALGOS if args.algo == "all" else (args.algo,)
    fits = []
    for algo in algos:
        problems = check_factory(args.factory, algo, num_envs=args.num_envs, kwargs=kwargs, obs_keys=args.obs_keys,
                                 mask_key=args.mask_key, max_steps=args.max_steps)
        if problems:
            print(f"{algo}: {len(problems)} problem{'s' * (len(problems) != 1)}")
            for p in problems:
                print(f"  {p}")
        else:
            fits.append(algo)
            print(f"{algo}: ok")
    if args.algo == "all":
        print(f"fits: {', '.join(fits) or 'none'}")
        return 0 if fits else 1
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
