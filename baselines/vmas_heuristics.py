"""Scripted reference policies for the tuned VMAS scenarios: the scale a learned policy is read against.

Each policy is a :class:`~tensordict.nn.TensorDictModule` reading the agent group's observation and
writing its action, so it runs through the same evaluation as a trained MAPPO policy
(``recipes.mappo_vmas.evaluate``: one full horizon of every eval env, the episode reward SUM)::

    from baselines.vmas_heuristics import reference_policy
    policy = reference_policy("buzz_wire", env)          # or "do_nothing", "random"

* ``wheel``: VMAS's own heuristic (``vmas.scenarios.wheel.HeuristicPolicy``: every agent chases a
  point 45 degrees ahead of one end of the line), and ``wheel_push``, written here: every agent
  pushes its half of the line round at a long lever, and lets go while it turns too fast.
* ``buzz_wire``: written here. Each agent steers to its side of the goal (the ball sits half-way
  between the two agents, so the ball then sits on the goal), with velocity damping and a capped
  speed so the ring does not swing into the wire.
* ``reverse_transport``: written here. Each agent heads for the package's wall on the goal side and
  keeps pressing on it; the push fades near the goal to limit overshoot.
* ``do_nothing`` (zero action) and ``random`` (uniform in the action bounds) for every scenario.

Observation layouts are those of VMAS 1.5 (see each scenario's ``observation``); a scenario
heuristic checks the observation width and fails with a clear error on another layout.
"""
from __future__ import annotations

from typing import Callable

import torch
from tensordict.nn import TensorDictModule
from torch import nn

__all__ = ["HEURISTICS", "reference_policy", "ScriptedPolicy"]


def _wheel_vmas(obs: torch.Tensor, u_range: float, **_) -> torch.Tensor:
    """VMAS's wheel heuristic (reused, not rewritten), applied to every agent."""
    from vmas.scenarios.wheel import HeuristicPolicy

    flat = obs.reshape(-1, obs.shape[-1])
    return HeuristicPolicy(continuous_action=True).compute_action(flat, u_range).reshape(*obs.shape[:-1], 2)


def _wheel_push(obs: torch.Tensor, u_range: float, desired_velocity: float = 0.05, lever: float = 0.8,
                gain: float = 4.0, push: float = 1.0, **_) -> torch.Tensor:
    """Written here: every agent turns the line counter-clockwise from its own half.

    obs = [pos(2), vel(2), centre - pos(2), end1 - pos(2), end2 - pos(2), rot, |omega|, error].
    The agent tracks a point just behind the line at ``lever`` of the half-length on its side (the
    point a counter-clockwise turn moves away from it) and pushes along the turn; it stops pushing
    while |omega| is above the target, so the line coasts back down instead of spinning up further.
    """
    to_centre, to_end1 = obs[..., 4:6], obs[..., 6:8]
    half = to_end1 - to_centre  # centre -> end 1
    unit = half / half.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    side = torch.sign((-to_centre * unit).sum(-1, keepdim=True))
    side = torch.where(side == 0, torch.ones_like(side), side)
    radial = side * unit  # centre -> the agent's end
    tangent = torch.cat([-radial[..., 1:2], radial[..., 0:1]], dim=-1)  # where a CCW turn moves that point
    contact = to_centre + radial * lever * half.norm(dim=-1, keepdim=True) - tangent * 0.05
    action = gain * contact + push * tangent
    slow_enough = obs[..., 11:12] < desired_velocity
    action = torch.where(slow_enough, action, gain * (contact - tangent * 0.1))  # step back, no push
    return action.clamp(-u_range, u_range)


def _buzz_wire(obs: torch.Tensor, u_range: float, spacing: float = 0.6, gain_x: float = 5.0, gain_y: float = 1.0,
               max_speed: float = 0.4, damping: float = 6.0, **_) -> torch.Tensor:
    """obs = [pos(2), vel(2), pos - goal(2)].

    The ball hangs from both agents on links of half the rest spacing; when the agents come closer
    than that it swings off their line, and an agent drifts into the wire. So each agent holds its
    side wide (x target ``goal_x -+ spacing / 2``, stiff) and climbs slowly (y speed capped).
    """
    vel, rel_goal = obs[..., 2:4], obs[..., 4:6]  # obs[..., 0:2] (the position) is not needed
    side = torch.sign(rel_goal[..., :1])
    side = torch.where(side == 0, torch.ones_like(side), side)
    err = torch.cat([side * spacing / 2 - rel_goal[..., :1], -rel_goal[..., 1:2]], dim=-1)
    desired = torch.cat([gain_x * err[..., :1], (gain_y * err[..., 1:2]).clamp(-max_speed, max_speed)], dim=-1)
    return (damping * (desired - vel)).clamp(-u_range, u_range)


def _reverse_transport(obs: torch.Tensor, u_range: float, reach: float = 0.6, slow_radius: float = 0.3,
                       **_) -> torch.Tensor:
    """obs = [pos(2), vel(2), package vel(2), package - agent(2), package - goal(2)]."""
    pkg_vel, rel_pkg, pkg_goal = obs[..., 4:6], obs[..., 6:8], obs[..., 8:10]
    dist = pkg_goal.norm(dim=-1, keepdim=True)
    direction = -pkg_goal / dist.clamp_min(1e-8)
    # a point beyond the package wall that faces the goal (half-width 0.3): pressing towards it pushes
    target = rel_pkg + direction * reach
    action = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    fade = (dist / slow_radius).clamp(max=1.0)
    return (u_range * action * fade - 0.5 * pkg_vel * (1 - fade)).clamp(-u_range, u_range)


HEURISTICS: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
    # scenario name: (observation width it expects, function)
    "wheel": (13, _wheel_vmas),
    "wheel_push": (13, _wheel_push),
    "buzz_wire": (6, _buzz_wire),
    "reverse_transport": (10, _reverse_transport),
}


class ScriptedPolicy(nn.Module):
    """obs [..., n_agents, obs_dim] -> action [..., n_agents, act_dim] through a fixed rule."""

    def __init__(self, rule: str, low: torch.Tensor, high: torch.Tensor, **params) -> None:
        super().__init__()
        self.rule, self.params = rule, params
        self.register_buffer("low", low.clone())
        self.register_buffer("high", high.clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        shape = (*obs.shape[:-1], self.low.shape[-1])
        if self.rule == "do_nothing":
            return torch.zeros(shape, dtype=self.low.dtype, device=obs.device).clamp(self.low, self.high)
        if self.rule == "random":
            u = torch.rand(shape, dtype=self.low.dtype, device=obs.device)
            return self.low + u * (self.high - self.low)
        width, fn = HEURISTICS[self.rule]
        if obs.shape[-1] != width:
            raise ValueError(f"the '{self.rule}' heuristic expects {width} observation features per agent "
                             f"(VMAS 1.5 layout), the env gives {obs.shape[-1]}")
        u_range = float(self.high.abs().max())
        return torch.max(torch.min(fn(obs, u_range, **self.params), self.high), self.low)


def reference_policy(rule: str, env, group: str | None = None, **params) -> TensorDictModule:
    """A scripted policy for ``env`` (built by ``recipes.mappo_vmas.make_env_from_config``).

    ``rule``: a key of :data:`HEURISTICS`, ``"do_nothing"`` or ``"random"``; ``params`` override the
    rule's keyword arguments (e.g. ``max_speed`` for buzz_wire).
    """
    if rule not in HEURISTICS and rule not in ("do_nothing", "random"):
        raise ValueError(f"unknown reference policy '{rule}'; choose from do_nothing, random, "
                         f"{', '.join(HEURISTICS)}")
    if group is None:  # the env's single agent group: the prefix of its ('<group>', 'action') key
        groups = sorted({k[0] for k in env.action_keys if isinstance(k, tuple) and len(k) == 2})
        if len(groups) != 1:
            raise ValueError(f"pass group=...: the env's action keys {env.action_keys} name {len(groups)} agent groups")
        group = groups[0]
    spec = env.full_action_spec[group, "action"]
    low = torch.as_tensor(spec.space.low, dtype=torch.float32)
    high = torch.as_tensor(spec.space.high, dtype=torch.float32)
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"scripted policies need bounded actions; {group}.action has low={low}, high={high}")
    low, high = low.reshape(-1, low.shape[-1])[0], high.reshape(-1, high.shape[-1])[0]
    return TensorDictModule(ScriptedPolicy(rule, low, high, **params), in_keys=[(group, "observation")],
                            out_keys=[(group, "action")])

