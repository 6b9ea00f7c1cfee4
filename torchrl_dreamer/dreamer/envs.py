"""Envs for the Dreamer recipe: Gymnasium ids (vector or pixel observations) or a user factory.

* Several envs run as a TorchRL ``SerialEnv`` of ``GymEnv``s: it keeps the exact semantics the
  replay needs (the terminal observation under ``("next", ...)``, the reset observation in the
  next root). Gymnasium's vector envs were measured and rejected: through TorchRL 0.14's wrapper
  their next-step autoreset loses the terminal observation (zeros) and puts it where the reset
  observation should be.
* Pixels are rendered by the env, then :class:`PixelsToUint8` resizes them to ``3 x 64 x 64``
  **uint8** right after ``env.step`` (in the env transform, never in the learner: doing it
  in the learner costs about 8x), so the replay stores 12 KiB per step.
* ``InitTracker`` writes ``is_first`` and ``RewardSum`` the running episode reward; the recipe
  appends the policy's ``TensorDictPrimer``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torchrl.data import Composite, Unbounded
from torchrl.envs import Compose, EnvBase, InitTracker, ObservationTransform, SerialEnv, TransformedEnv

from ..config import ConfigError
from ..envs import call_factory
from ..transforms import EpisodeRewardSum

__all__ = ["PixelsToUint8", "make_gym_env", "make_dreamer_env", "gym_env_ids", "EnvContractError"]


class PixelsToUint8(ObservationTransform):
    """``[..., H, W, C]`` uint8 frames -> ``[..., C, size, size]`` uint8 (area interpolation)."""

    def __init__(self, in_key: str = "pixels", size: int = 64) -> None:
        super().__init__(in_keys=[in_key], out_keys=[in_key])
        self.size = size

    def _apply_transform(self, frames: torch.Tensor) -> torch.Tensor:
        lead = frames.shape[:-3]
        x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return x.round().clamp(0, 255).to(torch.uint8).reshape(*lead, x.shape[1], self.size, self.size)

    def _reset(self, tensordict, tensordict_reset):
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        for key in self.in_keys:
            spec = observation_spec[key]
            lead = spec.shape[:-3]
            observation_spec[key] = Unbounded(shape=(*lead, spec.shape[-1], self.size, self.size), dtype=torch.uint8,
                                              device=spec.device)
        return observation_spec


def gym_env_ids() -> list[str]:
    import gymnasium

    return sorted(gymnasium.registry.keys())


def make_gym_env(env_id: str, *, num_envs: int = 1, pixels: bool = False, seed: int = 0, device: str = "cpu",
                 max_episode_steps: int = 0, kwargs: Mapping[str, Any] | None = None,
                 action_repeat: int = 1) -> EnvBase:
    """``SerialEnv`` of ``num_envs`` ``GymEnv(env_id)`` (one-hot actions for discrete spaces).

    ``action_repeat > 1`` is TorchRL's ``GymEnv(frame_skip=...)``: the action is applied for that
    many frames, the rewards are summed and the repeat stops at the frame that ends the episode.
    (TorchRL's ``FrameSkipTransform`` is not used: in 0.14 it keeps stepping after the episode
    ended.)"""
    from torchrl.envs import GymEnv

    if env_id not in gym_env_ids():
        close = [e for e in gym_env_ids() if env_id.split("-")[0].lower() in e.lower()][:8]
        raise ValueError(f"unknown Gymnasium env id '{env_id}'" + (f"; did you mean one of {close}?" if close else ""))
    gym_kwargs = dict(kwargs or {})
    if max_episode_steps:
        gym_kwargs["max_episode_steps"] = max_episode_steps

    def one() -> EnvBase:
        if pixels:
            return GymEnv(env_id, from_pixels=True, pixels_only=True, device=device, frame_skip=action_repeat,
                          **gym_kwargs)
        return GymEnv(env_id, device=device, frame_skip=action_repeat, **gym_kwargs)

    env = SerialEnv(num_envs, one, device=device) if num_envs > 1 else one()
    env.set_seed(seed)
    return env


def make_dreamer_env(*, env_id: str = "", factory: str = "", num_envs: int = 1, pixels: bool = False, seed: int = 0,
                     device: str = "cpu", max_episode_steps: int = 0, kwargs: Mapping[str, Any] | None = None,
                     pixel_size: int = 64, mask_key: str = "action_mask", check_as: str = "",
                     obs_keys: tuple[str, ...] = (), still_tol: float = 0.0,
                     time_feature: bool = False, action_repeat: int = 1) -> TransformedEnv:
    """A single-agent env as both single-agent recipes (Dreamer and PPO) train on it: the base env
    (Gymnasium id or ``package.module:function`` factory) with ``is_first``, episode reward sums
    and, for pixels, the uint8 resize. A ``Categorical`` action spec becomes ``OneHot``
    (:class:`~torchrl_dreamer.transforms.CategoricalToOneHot`); a boolean ``mask_key`` observation
    with discrete actions gets TorchRL's ``ActionMask`` (the action spec follows the mask, so
    random actions respect it).

    ``check_as="dreamer"|"ppo"`` runs the env contract (:mod:`torchrl_dreamer.check_env`) on a
    factory env first and raises :class:`EnvContractError` naming every problem. ``still_tol > 0``
    appends the steps-at-rest count to the vector ``observation``
    (:class:`~torchrl_dreamer.transforms.StillSteps`); ``time_feature`` appends log(1 + steps left)
    before the step limit (``max_episode_steps``, else the Gymnasium id's own) and makes the limit a
    termination (:class:`~torchrl_dreamer.transforms.TimeFeature`). ``action_repeat > 1`` (Gymnasium
    ids only) applies each action for that many frames (:func:`make_gym_env`); the time feature then
    counts agent steps, ``ceil(limit / action_repeat)`` of them."""
    from torchrl.data import Categorical, OneHot
    from torchrl.envs import ActionMask

    from ..transforms import CategoricalToOneHot, StillSteps, TimeFeature

    if still_tol > 0 and pixels:  # before any env is built
        raise ConfigError("env.still_tol counts steps at rest of the vector observation; it does not apply "
                          "with env.pixels=true")
    if action_repeat < 1:
        raise ConfigError(f"env.action_repeat must be >= 1, got {action_repeat}")
    if action_repeat > 1 and factory:
        raise ConfigError("env.action_repeat applies to Gymnasium ids; repeat actions inside the factory env "
                          "(a TorchRL env's own step) instead")
    limit = time_limit(env_id, factory, max_episode_steps, action_repeat) if time_feature else 0
    if time_feature and pixels:
        raise ConfigError("env.time_feature appends to the vector observation; it does not apply with "
                          "env.pixels=true")
    if factory:
        base = call_factory(factory, num_envs=num_envs, max_steps=max_episode_steps, device=device, seed=seed,
                            **dict(kwargs or {}))
        if check_as:
            from ..check_env import env_problems

            problems = env_problems(base, check_as, obs_keys=obs_keys or ("observation",), mask_key=mask_key,
                                    num_envs=num_envs)
            if problems:
                base.close(raise_if_closed=False)
                raise EnvContractError(factory, check_as, problems)
    else:
        base = make_gym_env(env_id, num_envs=num_envs, pixels=pixels, seed=seed, device=device,
                            max_episode_steps=max_episode_steps, kwargs=kwargs, action_repeat=action_repeat)
    transforms = [InitTracker(init_key="is_first")]
    if still_tol > 0:
        transforms.append(StillSteps(still_tol, "observation"))
    if limit:  # after StillSteps, whose count compares the entries before it (a changing time would never rest)
        transforms.append(TimeFeature(limit, "observation"))
    if isinstance(base.full_action_spec.get("action", None), Categorical):
        transforms.append(CategoricalToOneHot("action"))
    if pixels:
        transforms.append(PixelsToUint8("pixels", pixel_size))
    env = TransformedEnv(base, Compose(*transforms))
    if mask_key and mask_key in env.observation_spec.keys() and isinstance(env.action_spec_unbatched, OneHot):
        env.append_transform(ActionMask(action_key="action", mask_key=mask_key))
    env.append_transform(EpisodeRewardSum(env))
    return env


def time_limit(env_id: str, factory: str, max_episode_steps: int, action_repeat: int = 1) -> int:
    """The episode step limit ``env.time_feature`` measures time against, in agent steps:
    ``max_episode_steps`` when set, else the Gymnasium id's registered limit (both in frames), over
    ``action_repeat`` rounded up (the last agent step may end the episode part-way through its
    frames); a clear error when there is none."""
    frames = int(max_episode_steps) if max_episode_steps > 0 else 0
    if not frames and not factory:
        import gymnasium

        registered = gymnasium.spec(env_id).max_episode_steps if env_id in gym_env_ids() else None
        frames = int(registered or 0)
    if frames:
        return -(-frames // action_repeat)
    raise ConfigError(f"env.time_feature needs a step limit: set env.max_episode_steps "
                      f"({'the factory env' if factory else repr(env_id)} registers none)")


class EnvContractError(ConfigError):
    """A factory env that does not fit a recipe: every problem, one line each (the first names the factory)."""

    def __init__(self, factory: str, algo: str, problems) -> None:
        self.problems = list(problems)
        head = f"env.factory '{factory}' does not fit the {algo} recipe: {self.problems[0]}"
        more = [f"  also {p}" for p in self.problems[1:]]
        tail = (f"  (python -m torchrl_dreamer.check_env {factory} --algo {algo} prints this list)"
                if more else "")
        super().__init__("\n".join([head, *more, *([tail] if tail else [])]))
