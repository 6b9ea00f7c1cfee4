"""Building the envs a recipe trains on: VMAS scenarios or any user factory, plus shared transforms.

A custom env is named in a config as ``env.factory=package.module:function``. The function is
called with keyword arguments ``num_envs``, ``max_steps``, ``device``, ``seed`` and then the
config's ``env.kwargs``, and must return a TorchRL ``EnvBase`` (batched over ``num_envs``).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import torch
from torchrl.envs import Compose, EnvBase, TransformedEnv

from .config import ConfigError
from .transforms import DoneToAgents, EpisodeRewardSum

__all__ = [
    "resolve_factory",
    "call_factory",
    "EnvFactoryError",
    "vmas_scenarios",
    "make_vmas_env",
    "make_env",
    "with_shared_transforms",
    "episode_reward_transform",
]


class EnvFactoryError(ConfigError):
    """``env.factory`` cannot be imported or called, or does not return a TorchRL env."""


def resolve_factory(spec: str) -> Callable[..., EnvBase]:
    """``"package.module:function"`` -> the function, with errors that say what is wrong."""
    if ":" not in spec:
        raise EnvFactoryError(f"env.factory '{spec}' must look like 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing at import
        raise EnvFactoryError(f"env.factory '{spec}': cannot import module '{module_name}' "
                              f"({type(exc).__name__}: {exc}); is it installed or on PYTHONPATH?") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise EnvFactoryError(f"env.factory '{spec}': module '{module_name}' has no attribute '{attr}'") from None
    if not callable(factory):
        raise EnvFactoryError(f"env.factory '{spec}' is not callable")
    return factory


def call_factory(spec: str, **kwargs: Any) -> EnvBase:
    """Imports and calls ``env.factory`` with the recipe's keyword arguments; any failure becomes
    one :class:`EnvFactoryError` naming the factory and the arguments (the traceback is shown with
    ``TORCHRL_DREAMER_TRACEBACK=1``)."""
    fn = resolve_factory(spec)
    try:
        env = fn(**kwargs)
    except Exception as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EnvFactoryError(f"env.factory '{spec}' failed when called as {spec.partition(':')[2]}({args}): "
                              f"{type(exc).__name__}: {first}") from exc
    if not isinstance(env, EnvBase):
        raise EnvFactoryError(f"env.factory '{spec}' returned {type(env).__name__}, not a TorchRL EnvBase "
                              "(wrap a Gymnasium env with torchrl.envs.GymWrapper)")
    return env


def vmas_scenarios() -> list[str]:
    from torchrl.envs.libs.vmas import VmasEnv

    return list(VmasEnv.available_envs)


def make_vmas_env(
    scenario: str, *, num_envs: int, max_steps: int, device: str | torch.device, seed: int, **kwargs: Any
) -> EnvBase:
    """A batched VMAS env with continuous actions. Unknown scenario names fail at once."""
    available = vmas_scenarios()
    if scenario not in available:
        raise ValueError(f"unknown VMAS scenario '{scenario}'. Available: {', '.join(sorted(available))}")
    from torchrl.envs.libs.vmas import VmasEnv

    return VmasEnv(
        scenario=scenario,
        num_envs=num_envs,
        continuous_actions=True,
        max_steps=max_steps,
        device=device,
        seed=seed,
        **kwargs,
    )


def with_shared_transforms(base: EnvBase) -> TransformedEnv:
    """Adds :class:`DoneToAgents` (if the env has agent groups) and :class:`EpisodeRewardSum`."""
    transforms = []
    if any(len(k) > 1 for k in map(lambda k: (k,) if isinstance(k, str) else k, base.reward_keys)):
        transforms.append(DoneToAgents(base))
    transforms.append(EpisodeRewardSum(base))
    return TransformedEnv(base, Compose(*transforms))


def make_env(
    *,
    scenario: str,
    factory: str,
    kwargs: Mapping[str, Any],
    num_envs: int,
    max_steps: int,
    device: str | torch.device,
    seed: int,
) -> TransformedEnv:
    """The env of a recipe: ``factory`` if set, else the VMAS ``scenario``; with shared transforms."""
    kwargs = dict(kwargs)
    if factory:
        base = call_factory(factory, num_envs=num_envs, max_steps=max_steps, device=device, seed=seed, **kwargs)
    else:
        base = make_vmas_env(scenario, num_envs=num_envs, max_steps=max_steps, device=device, seed=seed, **kwargs)
    return with_shared_transforms(base)


def episode_reward_transform(env: TransformedEnv) -> EpisodeRewardSum:
    """The :class:`EpisodeRewardSum` inside an env built by :func:`with_shared_transforms`."""
    for t in env.transform:
        if isinstance(t, EpisodeRewardSum):
            return t
    raise ValueError("env has no EpisodeRewardSum transform")


