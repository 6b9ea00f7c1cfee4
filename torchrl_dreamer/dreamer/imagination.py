"""Imagination: roll the actor through the prior for H steps from posterior states.

The inner loop (:func:`imagine`) runs on plain tensors; :class:`ImaginationModule` is the TensorDict
boundary the training step uses (``deter``/``stoch``/``is_terminal`` in, a ``[N, H+1]`` trajectory
out). Reward and continue heads run once on all imagined states after the loop, not per step.

Trajectory layout (``[N, H+1]``, index t = imagined state s_t, s_0 = the posterior start state):

| key | meaning |
|---|---|
| ``deter``, ``stoch``, ``feat`` | state s_t (``feat = [deter, flatten(stoch)]``) |
| ``action`` | a_t sampled at s_t (zeros at t = H: no action is taken there) |
| ``log_prob``, ``entropy`` | of a_t under the policy at rollout time (no gradient; diagnostics) |
| ``reward`` | r_t predicted for arriving at s_t (0 at t = 0, unused) |
| ``cont`` | continue flag of s_t: the data's ``1 - is_terminal`` at t = 0, then the continue head's probability (or mode) |
| ``imagined`` | True where the model stepped to s_t; False on the steps ``stop_when_done`` filled after every trajectory ended |
| extra actor inputs | whatever :class:`ImaginationHooks` provide, e.g. ``action_mask`` |

Environment knowledge that need not be learned (for routing, the visited set is
a deterministic function of the actions) enters through :class:`ImaginationHooks`: exact action
masks, known rewards and known termination, updated from each imagined action.
"""
from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from .functional import symexp
from .nets import MaskDecoder, VectorEncoder, clip_action
from .rssm import gumbel_noise
from .world_model import DreamerWorldModel

__all__ = ["ImaginationHooks", "ActionMaskHooks", "imagine", "draw_noise", "ImaginationModule"]


class ImaginationHooks:
    """Deterministic env logic carried through imagination (default: none).

    Subclasses keep an ``aux`` state per imagined trajectory (any pytree of ``[N, ...]`` tensors),
    e.g. the visited set of a routing problem. ``start_keys`` names the replayed entries
    :meth:`start` and :meth:`actor_context` read (they travel with the start states).
    """

    start_keys: tuple[str, ...] = ()

    def start(self, start: TensorDictBase) -> Any:
        """aux state at the start states (``start`` holds the replayed rows, flattened to ``[N]``)."""
        return None

    def actor_inputs(self, aux: Any) -> dict[str, torch.Tensor]:
        """Extra keyword inputs of the actor at this state, e.g. ``{"action_mask": [N, A]}``."""
        return {}

    def step(self, aux: Any, action: torch.Tensor) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        """Advance ``aux`` with ``action [N, A]``. Returns ``(aux, known_reward [N] or None,
        known_terminal [N] bool or None)``; ``None`` means "use the world model's head"."""
        return aux, None, None

    def actor_context(self, start: TensorDictBase) -> dict[str, torch.Tensor]:
        """Per-trajectory constant actor inputs (e.g. encoded node embeddings); default none."""
        return {}

    def on_features(self, aux: Any, feat: torch.Tensor) -> Any:
        """``aux`` once the features ``feat [N, F]`` of a new imagined state are known (after
        :meth:`step` and :meth:`features`), e.g. a mask predicted from them; default unchanged."""
        return aux

    def features(self, world_model: DreamerWorldModel, deter: torch.Tensor, stoch: torch.Tensor, aux: Any,
                 context: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of an imagined state for the heads, critic and actor (default ``[h, z]``)."""
        return world_model.rssm.features(deter, stoch)

    def model_action(self, action: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """The actor's action -> the RSSM's action input (default: unchanged)."""
        return action


_VECTOR_ENCODERS = (VectorEncoder,)


class ActionMaskHooks(ImaginationHooks):
    """Action masks through imagination, for any env whose observations include its boolean action
    mask (the world model's ``mask_key`` observation, see :func:`~.agent.make_world_model`).

    * At a start state the replayed (real) mask is used.
    * At each imagined state the mask comes from ``rule`` when given: a function
      ``rule({name: observation [N, ...]}) -> bool [N, A]`` applied to the world model's decoded
      vector observations (in env units; pixels are not decoded), e.g. "no move into a wall" from
      a decoded position. Rows the rule leaves empty, and every state without a rule, use the
      world model's mask head (:meth:`MaskDecoder.predict`: at least one action always allowed).
    * The actor gets the mask as ``action_mask`` (unimix over allowed actions, exactly 0 on masked
      ones), so the trajectory carries it for :class:`~.losses.DreamerPolicyLoss`
      (``actor_input_keys=("action_mask",)``).

    A mask predicted in imagination is never used in the real env (the acting policy reads the
    env's mask). How good the imagined masks are is measured on the replayed states, where the
    real mask is known: ``last_accuracy`` is the fraction of mask entries predicted right at the
    last rollout's start states (a tensor, no host sync; :class:`~.update.DreamerUpdate` logs it
    as ``diag/imagined_mask_accuracy``).
    """

    def __init__(self, world_model: DreamerWorldModel, rule=None) -> None:
        if world_model.mask_key is None:
            raise ValueError("ActionMaskHooks needs a world model with a mask observation (mask_key)")
        self.world_model, self.rule = world_model, rule
        self.mask_key = world_model.mask_key
        self.start_keys = (self.mask_key, "feat")
        self.last_accuracy: torch.Tensor | None = None

    @torch.no_grad()
    def predict(self, feat: torch.Tensor) -> torch.Tensor:
        """The mask ``[N, A]`` imagination uses at states with features ``feat [N, F]``."""
        wm = self.world_model
        learned = MaskDecoder.predict(wm.decoders[self.mask_key](feat))
        if self.rule is None:
            return learned
        obs = {name: symexp(wm.decoders[name](feat)) for name in wm.obs_names
               if name != self.mask_key and isinstance(wm.encoders[name], _VECTOR_ENCODERS)}
        ruled = torch.as_tensor(self.rule(obs), device=feat.device).bool().reshape(learned.shape)
        return torch.where(ruled.any(-1, keepdim=True), ruled, learned)

    def start(self, start: TensorDictBase) -> torch.Tensor:
        real = start[self.mask_key].bool()
        self.last_accuracy = (self.predict(start["feat"]) == real).float().mean()
        return real

    def actor_inputs(self, aux: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"action_mask": aux}

    def on_features(self, aux: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return self.predict(feat)



def _policy_and_dynamics_step(rssm, actor, h, z, feat, inputs, context, grad: bool, model_action=None,
                              noise: tuple[torch.Tensor, ...] | None = None):
    """One imagined step: act at ``(h, z)``, advance the prior. Plain tensors in and out, so it can
    be compiled (:meth:`ImaginationModule.enable_compile`). ``noise``: this step's pre-drawn
    ``(action noise, stoch Gumbel noise, stoch mixture uniforms)`` (see :func:`draw_noise`), else random
    ops run here."""
    dist = actor(feat if grad else feat.detach(), **inputs, **context)
    if noise is not None:
        action = dist.sample_from_noise(noise[0])
    else:
        action = dist.rsample() if grad else dist.sample()
    log_prob, entropy = dist.log_prob(action.detach()), dist.entropy()
    # the learner keeps the raw sample (unbiased log-prob); the dynamics see the action the env would
    # (clipped to [-1, 1], straight-through; a no-op on one-hot actions)
    moved = action if getattr(actor, "discrete", False) else clip_action(action)
    h = rssm.img_step(h, z, moved if model_action is None else model_action(moved, context))
    z = rssm.prior_sample(h, None if noise is None else (noise[1], noise[2]))
    return action, log_prob, entropy, h, z


def _pad_after_the_end(actor, feat, inputs, context, steps: int, grad: bool, feats, deters, stochs, actions,
                       log_probs, entropies, extras) -> None:
    """Completes an imagined rollout stopped early (``stop_when_done``) to the ``[N, H+1]`` layout:
    the last state repeated, acted on with the actor's mode there (for routing the only legal move of
    a finished tour, as the full loop would draw; any action with a finite log-probability serves,
    since none of these steps has loss weight). Appends to the rollout's lists in place."""
    dist = actor(feat if grad else feat.detach(), **inputs, **context)
    mode = dist.mode()
    log_prob, entropy = dist.log_prob(mode.detach()), dist.entropy()
    for _ in range(steps):
        feats.append(feat)
        deters.append(deters[-1])
        stochs.append(stochs[-1])
        actions.append(mode)
        log_probs.append(log_prob)
        entropies.append(entropy)
        for k, v in inputs.items():
            extras[k].append(v)


def draw_noise(actor: nn.Module, rssm, n: int, horizon: int, device=None, dtype=torch.float32):
    """All the randomness of an imagined rollout, drawn at once: ``(action noise [H, N, A], stoch
    Gumbel noise [H, N, G, C], stoch mixture uniforms [H, N, G])`` (the last two for
    :meth:`RSSM.prior_sample`); action noise is standard Gumbel for discrete actors (Gumbel-max
    sampling), standard normal for continuous ones. Same distribution as drawing per step; one
    eager random call each instead of inductor's per-element generator in the graph."""
    a = actor.action_dim
    if getattr(actor, "discrete", False):
        action_noise = gumbel_noise((horizon, n, a), device, dtype)
    else:
        action_noise = torch.randn(horizon, n, a, device=device, dtype=dtype)
    return (action_noise, gumbel_noise((horizon, n, rssm.stoch, rssm.classes), device, dtype),
            torch.rand(horizon, n, rssm.stoch, device=device, dtype=dtype))


def imagine(world_model: DreamerWorldModel, actor: nn.Module, deter: torch.Tensor, stoch: torch.Tensor,
            start_cont: torch.Tensor, horizon: int, *, hooks: ImaginationHooks | None = None, aux: Any = None,
            context: dict[str, torch.Tensor] | None = None, grad: bool = False,
            step_fn=None, cont_mode: str = "prob",
            noise: tuple[torch.Tensor, ...] | None = None, stop_when_done: bool = False) -> dict[str, torch.Tensor]:
    """Rolls ``actor`` through the prior of ``world_model`` for ``horizon`` steps.

    Args:
        deter, stoch: start states ``[N, D]``, ``[N, G, C]`` (detached by the caller).
        start_cont: ``[N]`` continue flag of the start states (``1 - is_terminal``).
        hooks, aux: exact env logic and its state at the starts (see :class:`ImaginationHooks`).
        context: constant actor inputs per trajectory (passed to the actor every step).
        grad: keep the graph through the dynamics (actor gradients by backprop, continuous
            actions); otherwise everything runs under ``no_grad`` and the losses recompute what
            needs gradients from the stored features.
        step_fn: replacement for the per-step function (e.g. a compiled one; no-grad mode only).
        cont_mode: ``"prob"`` (the continue head's probability, as the 2024 reference code) or
            ``"mode"`` (0/1, the 2023 code). With rare terminal states (CartPole: ~2% of rows, all
            within 0.02 rad of non-terminal ones) the mode stays "continue" near the boundary
            and imagined failures never end; the probability discounts them smoothly.
        noise: pre-drawn randomness (:func:`draw_noise`) instead of random ops in the loop.
        stop_when_done: end the loop early once the hooks' known termination says every
            trajectory has ended (one host sync per step; eager loops only), and complete the
            ``[N, H+1]`` layout without running the model: the last state repeated, the actor's
            mode there as the action, reward and continuation 0. All those steps lie past a known
            terminal state, where the losses give no weight and the returns are those of the full
            loop with exact (zero) rewards after the end, so the losses are the full loop's
            (tested); only the world model's steps after every end are skipped. Ignored when the
            hooks know no termination.

    Returns the ``[N, H+1]`` trajectory described in the module docstring.
    """
    rssm = world_model.rssm
    hooks = hooks or ImaginationHooks()
    context = context or {}
    step = step_fn if (step_fn is not None and not grad) else _policy_and_dynamics_step
    with torch.set_grad_enabled(grad):
        feats, deters, stochs, actions, log_probs, entropies = [], [deter], [stoch], [], [], []
        extras: dict[str, list[torch.Tensor]] = {}
        known_rewards, known_terms = [], []
        h, z = deter, stoch
        model_action = None if type(hooks).model_action is ImaginationHooks.model_action else hooks.model_action
        on_features = hooks.on_features
        feat = hooks.features(world_model, h, z, aux, context)
        feats.append(feat)
        for t in range(horizon):
            inputs = hooks.actor_inputs(aux)
            for k, v in inputs.items():
                extras.setdefault(k, []).append(v)
            step_noise = None if noise is None else tuple(x[t] for x in noise)
            action, log_prob, entropy, h, z = step(rssm, actor, h, z, feat, inputs, context, grad, model_action,
                                                   step_noise)
            actions.append(action)
            log_probs.append(log_prob)
            entropies.append(entropy)
            aux, k_rew, k_term = hooks.step(aux, action)
            known_rewards.append(k_rew)
            known_terms.append(k_term)
            feat = hooks.features(world_model, h, z, aux, context)
            aux = on_features(aux, feat)
            deters.append(h)
            stochs.append(z)
            feats.append(feat)
            if stop_when_done and k_term is not None and bool(k_term.all()):
                break  # every imagined trajectory has ended: the rest carries no loss weight
        # the actor's inputs at the last state (not acted on, kept for a uniform [N, H+1] layout)
        last_inputs = hooks.actor_inputs(aux)
        for k, v in last_inputs.items():
            extras.setdefault(k, []).append(v)
        acted = len(actions)
        if acted < horizon:
            _pad_after_the_end(actor, feat, last_inputs, context, horizon - acted, grad, feats, deters, stochs,
                               actions, log_probs, entropies, extras)
        feat_all = torch.stack(feats, 1)
        future = feat_all[:, 1:acted + 1]
        if cont_mode not in ("prob", "mode"):
            raise ValueError(f"cont_mode must be 'prob' or 'mode', got '{cont_mode}'")
        # the heads run only where the hooks leave a step unknown (exact rewards and ends need none)
        reward = cont = None
        if any(r is None for r in known_rewards):
            reward = world_model.reward_head.mean(world_model.reward_head(future))
        if any(t is None for t in known_terms):
            cont_logit = world_model.continue_head(future)
            cont = torch.sigmoid(cont_logit) if cont_mode == "prob" else (cont_logit > 0).to(feat_all.dtype)
        if any(r is not None for r in known_rewards):
            reward = torch.stack([r.to(feat_all.dtype) if r is not None else reward[:, i]
                                  for i, r in enumerate(known_rewards)], 1)
        if any(t is not None for t in known_terms):
            cont = torch.stack([(~t).to(feat_all.dtype) if t is not None else cont[:, i]
                                for i, t in enumerate(known_terms)], 1)
        if acted < horizon:  # past every trajectory's end: no reward, no continuation
            after = torch.zeros(reward.shape[0], horizon - acted, dtype=feat_all.dtype, device=feat_all.device)
            reward, cont = torch.cat([reward, after], 1), torch.cat([cont, after], 1)
        n = deter.shape[0]
        zeros = torch.zeros(n, 1, dtype=feat_all.dtype, device=feat_all.device)
        action_all = torch.stack(actions, 1)
        out = {
            "deter": torch.stack(deters, 1),
            "stoch": torch.stack(stochs, 1),
            "feat": feat_all,
            "action": torch.cat([action_all, torch.zeros_like(action_all[:, :1])], 1),
            "log_prob": torch.cat([torch.stack(log_probs, 1), zeros], 1).detach(),
            "entropy": torch.cat([torch.stack(entropies, 1), zeros], 1).detach(),
            "reward": torch.cat([zeros, reward], 1),
            "cont": torch.cat([start_cont.reshape(n, 1).to(feat_all.dtype), cont], 1),
            # states the model stepped to (False: the layout's padding after every trajectory ended);
            # one [H+1] row broadcast, so the losses can skip the padding (see imagined_steps)
            "imagined": (torch.arange(horizon + 1, device=feat_all.device) <= acted).expand(n, horizon + 1),
        }
        for k, v in extras.items():
            out[k] = torch.stack(v, 1)
    return out


class ImaginationModule(TensorDictModuleBase):
    """TensorDict boundary of :func:`imagine`.

    Reads ``deter [*B, D]``, ``stoch [*B, G, C]`` and ``is_terminal [*B]`` (any batch shape, e.g. the
    ``[B, T]`` posterior states of a replayed slice, flattened to ``N`` starts) and returns a new
    TensorDict ``[N, H+1]`` with the trajectory (see the module docstring). ``start_fraction < 1``
    imagines from a random subset of the starts (a CPU budget knob; DreamerV3 uses all); with
    ``live_starts`` the subset is drawn from the non-terminal rows first (padded episode batches, as
    routing's, hold many terminal rows). ``group_size = K > 1`` imagines ``K`` trajectories from each
    start (the same number of trajectories in all: ``n // K`` distinct starts, each repeated ``K``
    times in consecutive rows), for :class:`~.losses.DreamerPolicyLoss`'s group baseline.
    ``stop_when_done``: stop stepping the model once every trajectory has reached a terminal state
    the hooks know exactly (routing: the tour is complete), same layout and losses (see
    :func:`imagine`). Not with ``enable_compile("loop")`` (a data-dependent exit).
    """

    def __init__(self, world_model: DreamerWorldModel, actor: nn.Module, horizon: int = 15, *,
                 hooks: ImaginationHooks | None = None, start_fraction: float = 1.0, grad: bool = False,
                 cont_mode: str = "prob", live_starts: bool = False, group_size: int = 1,
                 stop_when_done: bool = False) -> None:
        super().__init__()
        if int(group_size) != group_size or group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {group_size}")
        if horizon < 1:
            raise ValueError(f"imagination horizon must be >= 1, got {horizon}")
        if not 0 < start_fraction <= 1:
            raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
        self.world_model, self.actor = world_model, actor
        if cont_mode not in ("prob", "mode"):
            raise ValueError(f"cont_mode must be 'prob' or 'mode', got '{cont_mode}'")
        self.horizon, self.hooks, self.start_fraction, self.grad = horizon, hooks, start_fraction, grad
        self.cont_mode = cont_mode
        self.live_starts = live_starts
        self.group_size = int(group_size)
        self.stop_when_done = stop_when_done
        self.step_fn = None
        self.imagine_fn = imagine
        self.predraw_noise = False  # draw all randomness before the loop (set by enable_compile("loop"))
        self.in_keys = ["deter", "stoch", "is_terminal"]
        self.out_keys = ["deter", "stoch", "feat", "action", "log_prob", "entropy", "reward", "cont", "imagined"]

    def enable_compile(self, mode: str = "step", **kwargs) -> None:
        """``torch.compile`` the per-step function (``mode="step"``: policy + prior step) or the
        whole rollout (``mode="loop"``: all ``horizon`` steps and the reward/continue heads as one
        graph; ~40 s to compile at horizon 15 on one core, then ~2x faster). Optional, measure first."""
        if mode == "step":
            self.step_fn = torch.compile(_policy_and_dynamics_step, dynamic=False, **kwargs)
        elif mode == "loop":
            if self.stop_when_done:
                raise ValueError("stop_when_done needs an eager imagination loop (not enable_compile('loop'))")
            self.imagine_fn = torch.compile(imagine, dynamic=False, **kwargs)
            self.predraw_noise = True
        else:
            raise ValueError(f"compile mode must be 'step' or 'loop', got '{mode}'")

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        hooks = self.hooks or ImaginationHooks()
        start = tensordict.select(*self.in_keys, *hooks.start_keys).reshape(-1)
        k = self.group_size
        if self.start_fraction < 1.0 or k > 1:
            n = max(1, int(round(start.shape[0] * self.start_fraction)))
            distinct = max(1, n // k)  # K trajectories per start: the same imagination cost in all
            if self.live_starts:
                # the same number of starts, drawn from the non-terminal rows first: a terminal (or
                # padding) start imagines nothing, adds zeros to the return statistics and costs as much
                dead = start["is_terminal"].reshape(-1).to(torch.float32)
                order = (torch.rand(start.shape[0], device=start.device) + dead).argsort()
            else:
                order = torch.randperm(start.shape[0], device=start.device)
            chosen = order[:distinct]
            start = start[chosen.repeat_interleave(k) if k > 1 else chosen]
        deter, stoch = start["deter"].detach(), start["stoch"].detach()
        start_cont = 1.0 - start["is_terminal"].to(deter.dtype)
        context = hooks.actor_context(start)
        out = self.imagine_fn(self.world_model, self.actor, deter, stoch, start_cont, self.horizon, hooks=hooks,
                      aux=hooks.start(start), context=context, grad=self.grad, step_fn=self.step_fn,
                      cont_mode=self.cont_mode, stop_when_done=self.stop_when_done,
                      noise=draw_noise(self.actor, self.world_model.rssm, deter.shape[0], self.horizon, deter.device,
                                       deter.dtype) if self.predraw_noise else None)
        n, length = deter.shape[0], self.horizon + 1
        for key, value in context.items():  # per-trajectory constants, as [N, H+1] views (no copy)
            out[key] = value.unsqueeze(1).expand(n, length, *value.shape[1:])
        return TensorDict(out, batch_size=[n, length], device=deter.device)
