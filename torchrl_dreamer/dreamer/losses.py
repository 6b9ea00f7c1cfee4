"""DreamerV3 losses as TorchRL ``LossModule``s.

* :class:`DreamerWorldModelLoss`: reconstruction (symlog MSE / pixel MSE), reward (two-hot), continue
  (Bernoulli) and the balanced KL with free bits (``dyn`` 0.5, ``rep`` 0.1, 1 nat on the KL summed
  over latents per (batch, time); ``free_bits_grad`` ``"clip"`` as in the paper or
  ``"straight_through"``). Returns ``(loss_td, states_td)``: the losses and the detached posterior
  states that imagination starts from.
* :class:`DreamerCriticLoss`: two-hot regression of the critic on lambda-returns of the imagined
  trajectory, plus the slow-critic regulariser (the slow critic is an EMA copy, fraction 0.02 per
  update) and an optional replay-value loss. Returns ``(loss_td, targets_td)`` with
  ``value``/``lambda_return``/``weight`` for the actor loss.
* :class:`DreamerPolicyLoss`: REINFORCE with the stop-gradient advantage divided by
  ``max(1, EMA of P95 - P5 of the lambda-returns)`` plus entropy 3e-4 (``actor_grad="reinforce"``),
  or backpropagation of the normalised return through the dynamics (``"dynamics"``, continuous
  actions).

Discount and lambda are set with ``make_value_estimator(ValueEstimators.TDLambda, gamma=...,
lmbda=...)`` (defaults 0.997 and 0.95): lambda-returns use r_{t+1}, c_{t+1} and V(s_{t+1})
(:func:`~torchrl_dreamer.dreamer.functional.lambda_returns`, tested against a naive loop and
against TorchRL's ``td_lambda_return_estimate``).

Every loss reads its inputs through ``self.tensor_keys`` (rename them with ``set_keys``), never
writes into its input, and returns trainable entries named ``loss_*`` plus detached diagnostics.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives import LossModule, ValueEstimators

from .functional import ReturnNormalizer, kl_loss, lambda_returns
from .nets import TwoHotHead
from .rssm import gumbel_noise
from .world_model import DreamerWorldModel

__all__ = ["LambdaReturn", "DreamerWorldModelLoss", "DreamerCriticLoss", "DreamerPolicyLoss", "imagination_weight",
           "imagined_steps"]


class LambdaReturn:
    """The value estimator of the Dreamer losses: ``R_t = r_{t+1} + gamma c_{t+1} ((1 - lmbda)
    V_{t+1} + lmbda R_{t+1})``, ``R_H = V_H``, on ``[N, H+1]`` imagined trajectories."""

    def __init__(self, gamma: float = 0.997, lmbda: float = 0.95) -> None:
        if not 0 < gamma <= 1 or not 0 <= lmbda <= 1:
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= lmbda <= 1; got {gamma}, {lmbda}")
        self.gamma, self.lmbda = float(gamma), float(lmbda)

    def __call__(self, reward: torch.Tensor, cont: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``reward``, ``cont``, ``value``: ``[N, H+1]`` (index 0 of reward unused) -> ``[N, H]``."""
        return lambda_returns(reward[:, 1:], cont[:, 1:], value, discount=self.gamma, lmbda=self.lmbda)


def imagination_weight(cont: torch.Tensor, gamma: float) -> torch.Tensor:
    """``[N, H+1]`` loss weights: the discounted probability that s_t is reached and not past a
    terminal state, ``cont_0 * prod_{k=1..t} gamma * cont_k`` (DreamerV3's ``cumprod(disc * cont) / disc``)."""
    return torch.cumprod(gamma * cont, 1) / gamma


class _BroadcastFirstRow(torch.autograd.Function):
    """``x[:, 0]`` of ``x [N, L, ...]`` whose ``L`` rows are one ``[N, ...]`` tensor broadcast along
    dim 1 (stride 0: how :class:`~.imagination.ImaginationModule` stores per-trajectory constants).
    Plain indexing would back-propagate through a zero-filled ``[N, L, ...]`` gradient (for the
    routing actor's cache, tens of MB per update); here the gradient goes back as the same broadcast,
    ``g / L`` in every row, which the broadcast's own backward sums to ``g``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.length = x.shape[1]
        return x.select(1, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return (grad / ctx.length).unsqueeze(1).expand(grad.shape[0], ctx.length, *grad.shape[1:])


def imagined_steps(traj: TensorDictBase) -> int | None:
    """``L`` when the world model stepped only to ``s_0 .. s_L`` of an ``[N, H+1]`` trajectory
    (``L < H``: :func:`~.imagination.imagine` with ``stop_when_done`` ended the loop once every
    trajectory had reached a known terminal state and padded the layout), else ``None``.

    Past ``s_L`` every reward and continuation is exactly 0, so those steps carry no loss weight
    and their lambda-returns are 0 whatever the critic predicts there: the critic and actor
    losses run their networks on ``s_0 .. s_L`` only and divide by ``N * H`` as before (same
    losses, tested), while the return normaliser still sees all ``N * H`` returns (the zeros
    included), so its percentiles are unchanged. One host sync."""
    mask = traj.get("imagined", None)
    if mask is None:
        return None
    steps = int(mask[0].sum()) - 1
    return steps if steps < mask.shape[1] - 1 else None


def per_trajectory(x: torch.Tensor) -> torch.Tensor:
    """``[N, L, ...] -> [N, ...]``: the first row of a per-trajectory constant stored along the
    trajectory (cheap gradient for a stride-0 broadcast, see :class:`_BroadcastFirstRow`)."""
    if x.requires_grad and x.ndim >= 2 and x.shape[1] > 1 and x.stride(1) == 0:
        return _BroadcastFirstRow.apply(x)
    return x[:, 0]


def _require(td: TensorDictBase, key: NestedKey, loss: str) -> torch.Tensor:
    value = td.get(key, None)
    if value is None:
        raise KeyError(f"{loss} needs '{key}' in its input (rename with set_keys); got keys {list(td.keys(True, True))}")
    return value


class _DreamerLoss(LossModule):
    default_value_estimator = ValueEstimators.TDLambda

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass  # the estimator works on tensors, not keys

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams):
        """Only ``ValueEstimators.TDLambda`` (lambda-returns); ``gamma`` and ``lmbda`` keywords."""
        value_type = value_type or self.default_value_estimator
        if value_type is not ValueEstimators.TDLambda:
            raise NotImplementedError(f"Dreamer losses use lambda-returns (ValueEstimators.TDLambda), got {value_type}")
        self.value_type = value_type
        self._value_estimator = LambdaReturn(**{"gamma": 0.997, "lmbda": 0.95, **hyperparams})
        return self

    @property
    def value_estimator(self) -> LambdaReturn:
        if self._value_estimator is None:
            self.make_value_estimator()
        return self._value_estimator

    @value_estimator.setter
    def value_estimator(self, value) -> None:
        self._value_estimator = value


class DreamerWorldModelLoss(_DreamerLoss):
    """World-model loss on replayed ``[B, T]`` slices (layout in :mod:`.world_model`).

    Args:
        world_model: the :class:`DreamerWorldModel`.
        dyn_scale, rep_scale: KL balancing weights (paper: 0.5 and 0.1).
        free_bits: nats, on the KL summed over latents per (batch, time).
        free_bits_grad: ``"clip"`` (paper: no gradient below the threshold, on purpose) or
            ``"straight_through"`` (value clipped, raw KL gradient kept).
        reconstruction_scale, reward_scale, continue_scale: weights of the other terms (1.0).
        terminal_weight: weight of terminal rows in the continue loss (1.0 = the paper). Terminal
            states are rare (CartPole: ~2% of rows, and only a few hundredths of a radian or
            centimetre away from non-terminal ones); with equal weights the continue head learns
            them far slower than the rest of the model, imagined trajectories never end and the
            actor is not told that running off the track ends the episode.
        terminal_reward_weight: weight of terminal rows in the reward loss (1.0 = the paper). Where an
            episode ends with a large, rare reward (LunarLander: +100 for coming to rest, -100 for a
            crash, about one row in several hundred), the two-hot reward head otherwise predicts the
            shaping reward there and imagination never sees the bonus or the penalty.

    ``forward(td)`` returns ``(loss_td, states_td)``: ``loss_td`` holds ``loss_reconstruction``,
    ``loss_reward``, ``loss_continue``, ``loss_dyn``, ``loss_rep`` (already weighted; their sum is
    the world-model loss) and detached diagnostics; ``states_td`` (``[B, T]``) holds the detached
    ``deter``, ``stoch``, ``feat`` and the ``is_terminal``/``reward`` rows for imagination.
    """

    @dataclass
    class _AcceptedKeys:
        """Input keys. ``observation``/``pixels`` name the vector and image observations; other
        observation names of the world model are read under their own name.

        action: one-hot or continuous action taken at each row ``[B, T, A]``.
        reward: reward received on arriving at the row ``[B, T]`` (or ``[B, T, 1]``).
        is_first / is_terminal: episode start / terminal state flags ``[B, T]`` (or ``[B, T, 1]``).
        valid: optional ``[B, T]`` mask of real rows in padded sequences (absent = all real).
        """

        observation: NestedKey = "observation"
        pixels: NestedKey = "pixels"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        is_first: NestedKey = "is_first"
        is_terminal: NestedKey = "is_terminal"
        valid: NestedKey = "valid"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(self, world_model: DreamerWorldModel, *, dyn_scale: float = 0.5, rep_scale: float = 0.1,
                 free_bits: float = 1.0, free_bits_grad: Literal["clip", "straight_through"] = "clip",
                 reconstruction_scale: float = 1.0, reward_scale: float = 1.0, continue_scale: float = 1.0,
                 terminal_weight: float = 1.0, terminal_reward_weight: float = 1.0) -> None:
        super().__init__()
        for name, value in (("terminal_weight", terminal_weight), ("terminal_reward_weight", terminal_reward_weight)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.terminal_weight = float(terminal_weight)
        self.terminal_reward_weight = float(terminal_reward_weight)
        if free_bits_grad not in ("clip", "straight_through"):
            raise ValueError(f"free_bits_grad must be 'clip' or 'straight_through', got '{free_bits_grad}'")
        self.world_model = world_model
        self.dyn_scale, self.rep_scale, self.free_bits = float(dyn_scale), float(rep_scale), float(free_bits)
        self.free_bits_grad = free_bits_grad
        self.reconstruction_scale = float(reconstruction_scale)
        self.reward_scale, self.continue_scale = float(reward_scale), float(continue_scale)

    def _obs_key(self, name: str) -> NestedKey:
        return getattr(self.tensor_keys, name) if name in ("observation", "pixels") else name

    @property
    def in_keys(self) -> list[NestedKey]:
        k = self.tensor_keys
        return [*(self._obs_key(n) for n in self.world_model.obs_names), k.action, k.reward, k.is_first, k.is_terminal]

    @staticmethod
    def _flag(td: TensorDictBase, key: NestedKey, shape: torch.Size) -> torch.Tensor:
        value = _require(td, key, "DreamerWorldModelLoss")
        if value.shape != shape:
            if value.shape == (*shape, 1):
                value = value.squeeze(-1)
            else:
                raise ValueError(f"'{key}' must be {tuple(shape)} or {tuple(shape)}+(1,), got {tuple(value.shape)}")
        return value

    def forward(self, tensordict: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        if tensordict.batch_dims != 2:
            raise ValueError(f"DreamerWorldModelLoss expects a [B, T] tensordict, got batch size {tuple(tensordict.batch_size)}")
        k = self.tensor_keys
        bt = tensordict.batch_size
        wm = self.world_model
        obs = {n: _require(tensordict, self._obs_key(n), "DreamerWorldModelLoss") for n in wm.obs_names}
        action = _require(tensordict, k.action, "DreamerWorldModelLoss")
        if action.shape[:2] != bt or action.ndim != 3:
            raise ValueError(f"'{k.action}' must be [B, T, A] = {tuple(bt)} + (A,), got {tuple(action.shape)}")
        action = action.to(wm.rssm.init_deter.dtype)
        reward = self._flag(tensordict, k.reward, bt).to(action.dtype)
        is_first = self._flag(tensordict, k.is_first, bt).bool()
        is_terminal = self._flag(tensordict, k.is_terminal, bt).bool()
        valid = tensordict.get(k.valid, None)
        if valid is not None:
            valid = self._flag(tensordict, k.valid, bt).to(action.dtype)

        compiled = self.__dict__.get("_compiled_core")
        if compiled is not None:
            # the posterior samples' noise is drawn eagerly (the same random numbers as the eager
            # path draws), the rest (encoders, scan, heads, KL; forward and backward) is one graph
            rssm = wm.rssm
            noise = gumbel_noise((*bt, rssm.stoch, rssm.classes), action.device, action.dtype)
            out, losses, diag = compiled(obs, action, is_first, reward, is_terminal, valid, noise)
        else:
            out, losses, diag = self._core(obs, action, is_first, reward, is_terminal, valid, None)
        feat = out["feat"]
        loss_td = TensorDict({**losses, **{name: value.detach() for name, value in diag.items()}}, batch_size=[])
        states_td = TensorDict({
            "deter": out["deter"].detach(), "stoch": out["stoch"].detach(), "feat": feat.detach(),
            # padded rows start nothing: imagination weights them like terminal states
            "is_terminal": is_terminal if valid is None else is_terminal | (valid == 0),
            "is_first": is_first, "reward": reward,
            **obs,  # references (no copy): exact-state hooks of imagination read them
            **{k: v.detach() for k, v in out.get("carry", {}).items()},
        }, batch_size=bt, device=feat.device)
        return loss_td, states_td


    def _core(self, obs: dict[str, torch.Tensor], action: torch.Tensor, is_first: torch.Tensor, reward: torch.Tensor,
              is_terminal: torch.Tensor, valid: torch.Tensor | None, noise: torch.Tensor | None):
        """The whole loss on plain tensors (compilable): posterior scan, then :meth:`_terms`.
        Returns ``(observe outputs, losses, diagnostics)``."""
        out = self.world_model.observe(obs, action, is_first, noise=noise)
        losses, diag = self._terms(out, obs, reward, is_terminal, valid)
        return out, losses, diag

    def _terms(self, out: dict[str, torch.Tensor], obs: dict[str, torch.Tensor], reward: torch.Tensor,
               is_terminal: torch.Tensor, valid: torch.Tensor | None):
        """Everything after the posterior scan on plain tensors (compilable): heads, reconstruction,
        KL with free bits, diagnostics. Returns ``(losses, diagnostics)`` dicts."""
        wm = self.world_model
        if valid is None:
            mean = torch.mean
        else:
            n_valid = valid.sum().clamp_min(1.0)
            mean = lambda x: (x * valid).sum() / n_valid  # noqa: E731
        feat = out["feat"]
        recon = wm.reconstruction_losses(feat, obs, out)
        reward_logits = wm.reward_head(feat)
        loss_reward = wm.reward_head.loss(reward_logits, reward)
        if self.terminal_reward_weight != 1.0:  # rare end-of-episode rewards weigh more (see the argument's doc)
            loss_reward = loss_reward * torch.where(is_terminal, self.terminal_reward_weight, 1.0)
        cont_target = (~is_terminal).to(feat.dtype)
        cont_logit = wm.continue_head(feat)
        loss_continue = wm.continue_head.loss(cont_logit, cont_target)
        if self.terminal_weight != 1.0:  # rare terminal rows weigh more (see the argument's doc)
            loss_continue = loss_continue * torch.where(is_terminal, self.terminal_weight, 1.0)
        kl = kl_loss(out["posterior_logits"], out["prior_logits"], dyn_scale=self.dyn_scale, rep_scale=self.rep_scale,
                     free_bits=self.free_bits, free_bits_grad=self.free_bits_grad, weight=valid)
        loss_reconstruction = sum(mean(v) for v in recon.values())

        with torch.no_grad():
            post_p = out["posterior_logits"].exp()
            prior_p = out["prior_logits"].exp()
            diag = {
                "kl_raw": kl["kl_raw"],
                "posterior_entropy": mean(-(post_p * out["posterior_logits"]).sum((-2, -1))),
                "prior_entropy": mean(-(prior_p * out["prior_logits"]).sum((-2, -1))),
                "reward_pred_mean": mean(wm.reward_head.mean(reward_logits)),
                "continue_accuracy": mean(((cont_logit > 0).to(feat.dtype) == cont_target).float()),
                # calibration where it matters: the continue probability on the (rare) terminal rows,
                # as two sums that a log window divides (see terminal_calibration in update.py)
                "terminal_rows": (terminal := is_terminal.to(feat.dtype) * (1.0 if valid is None else valid)).sum(),
                "continue_prob_terminal_sum": (torch.sigmoid(cont_logit) * terminal).sum(),
                **{f"reconstruction_{n}": mean(v) for n, v in recon.items()},
            }
        losses = {
            "loss_reconstruction": self.reconstruction_scale * loss_reconstruction,
            "loss_reward": self.reward_scale * mean(loss_reward),
            "loss_continue": self.continue_scale * mean(loss_continue),
            "loss_dyn": self.dyn_scale * kl["dyn"],
            "loss_rep": self.rep_scale * kl["rep"],
        }
        return losses, diag

    def enable_compile(self, **kwargs) -> None:
        """``torch.compile`` the whole loss as one graph, forward and backward: encoders, the
        posterior scan (is_first resets as masks), heads, reconstruction, KL (:meth:`_core`). The
        eager code between a separately compiled scan and the loss terms (encoders, the prior over
        all steps, the feature concat, and their autograd nodes) cost about as much as the two
        compiled graphs themselves at the benchmark sizes. Same values as eager (tested)."""
        self.__dict__["_compiled_core"] = torch.compile(self._core, dynamic=False, **kwargs)


class DreamerCriticLoss(_DreamerLoss):
    """Two-hot critic on lambda-returns of imagined trajectories, with a slow EMA critic.

    Args:
        critic: :class:`TwoHotHead` ``feat -> value logits``.
        slow_fraction: EMA fraction of :meth:`update_slow_critic` (paper 0.02, every update).
        slow_reg_scale: weight of the two-hot loss towards the slow critic's prediction (1.0).
        replay_scale: weight of the optional replay-value loss (:meth:`replay_loss`; 0 = off).

    ``forward(traj)`` (``[N, H+1]``: ``feat``, ``reward``, ``cont``) returns ``(loss_td,
    targets_td)`` with ``loss_critic`` and ``targets_td`` = ``value [N, H+1]`` (online critic,
    detached), ``lambda_return [N, H]`` and ``weight [N, H+1]`` for :class:`DreamerPolicyLoss`.
    """

    @dataclass
    class _AcceptedKeys:
        """feat: imagined features ``[N, H+1, F]``; reward: predicted r_t ``[N, H+1]``;
        cont: continue flags ``[N, H+1]``."""

        feat: NestedKey = "feat"
        reward: NestedKey = "reward"
        cont: NestedKey = "cont"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(self, critic: TwoHotHead, *, slow_fraction: float = 0.02, slow_reg_scale: float = 1.0,
                 replay_scale: float = 0.0) -> None:
        super().__init__()
        self.critic = critic
        self.slow_critic = copy.deepcopy(critic).requires_grad_(False)
        self.slow_fraction, self.slow_reg_scale = float(slow_fraction), float(slow_reg_scale)
        self.replay_scale = float(replay_scale)

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        """``slow <- (1 - fraction) * slow + fraction * critic`` (call after each optimizer step)."""
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.lerp_(fast, self.slow_fraction)

    def forward(self, traj: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        k = self.tensor_keys
        feat = _require(traj, k.feat, "DreamerCriticLoss").detach()
        reward, cont = _require(traj, k.reward, "DreamerCriticLoss").detach(), _require(traj, k.cont, "DreamerCriticLoss").detach()
        steps = imagined_steps(traj)
        if steps is None:
            fn = self.__dict__.get("_compiled_terms") or self._terms
            loss_critic, value, ret, weight, stats = fn(feat, reward, cont)
        else:  # eager: a compiled core would recompile for every length
            loss_critic, value, ret, weight, stats = self._terms(feat, reward, cont, steps)
        loss_td = TensorDict({"loss_critic": loss_critic, **dict(zip(self._STATS, stats.unbind(0)))}, batch_size=[])
        targets_td = TensorDict({"value": value, "weight": weight}, batch_size=traj.batch_size, device=feat.device)
        targets_td["lambda_return"] = torch.cat([ret, value[:, -1:]], 1)  # padded to [N, H+1] (R_H = V_H)
        return loss_td, targets_td

    _STATS = ("value_min", "value_max", "value_mean", "lambda_return_min", "lambda_return_max",
              "lambda_return_mean", "imagined_reward_mean", "imagined_cont_mean")

    def _terms(self, feat: torch.Tensor, reward: torch.Tensor, cont: torch.Tensor, steps: int | None = None):
        """The loss on plain tensors (compilable): ``(loss, value [N, H+1], ret [N, H], weight, stats)``.

        ``steps = L`` (:func:`imagined_steps`): the critic runs on ``s_0 .. s_L`` only; the values
        past ``s_L`` are returned as 0 (each is multiplied by a zero continuation in the returns)
        and the value statistics cover ``s_0 .. s_L``."""
        horizon = feat.shape[1] - 1
        if steps is not None:
            feat = feat[:, :steps + 1].contiguous()  # contiguous: one matmul over all rows (see below)
        logits = self.critic(feat)  # [N, H+1, bins] (steps: [N, L+1, bins])
        value, lse = self.critic.codec.decode_and_lse(logits)
        value = value.detach()
        stats_value = value
        if steps is not None:
            value = torch.nn.functional.pad(value, (0, horizon - steps))
        estimator = self.value_estimator
        ret = estimator(reward, cont, value)  # [N, H]
        weight = imagination_weight(cont, estimator.gamma)
        with torch.no_grad():
            # on all H+1 (contiguous) states, then sliced: a [N, H, F] slice of feat is not a
            # matrix view, and the layer's matmul on it became a batched matmul with the weight
            # broadcast per trajectory (~2x the time of one matmul over all rows on CPU)
            slow_value = self.slow_critic.mean(self.slow_critic(feat))[:, :-1]
        head = logits[:, :-1]
        acted = head.shape[1]
        # lambda-return and slow-critic targets share one logsumexp (one softmax in the backward)
        per_step = self.critic.codec.mixture_loss(head, (ret[:, :acted], slow_value), (1.0, self.slow_reg_scale),
                                                  lse[:, :-1])
        if steps is None:
            loss_critic = (per_step * weight[:, :-1]).mean()
        else:  # the mean over all N * H steps: the skipped ones have zero weight
            loss_critic = (per_step * weight[:, :acted]).sum() / (per_step.shape[0] * horizon)
        stats = torch.stack([stats_value.min(), stats_value.max(), stats_value.mean(), ret.min(), ret.max(), ret.mean(),
                             reward[:, 1:].mean(), cont[:, 1:].mean()]).detach()
        return loss_critic, value, ret, weight, stats

    def enable_compile(self, **kwargs) -> None:
        """``torch.compile`` the tensor core of the loss (forward and, through AOTAutograd, its
        backward): :meth:`forward` and :meth:`replay_loss`. Same values as eager (tested)."""
        self.__dict__["_compiled_terms"] = torch.compile(self._terms, dynamic=False, **kwargs)
        self.__dict__["_compiled_replay"] = torch.compile(self._replay_terms, dynamic=False, **kwargs)

    def replay_loss(self, states: TensorDictBase, imagined_return: torch.Tensor | None = None) -> torch.Tensor:
        """Optional replay-value loss: lambda-returns along the *replayed* slice ``[B, T]`` with the
        data's rewards and terminals regress the critic at the replayed states. Real outcomes
        (e.g. the cart leaving the track) reach the critic even where the continue head misses them.

        Bootstrap values: the imagined return of each state (``imagined_return [B, T]``, DreamerV3
        2024, needs imagination from every replayed state) or, when ``None``, the critic's own
        (detached) prediction: TD(lambda) on replay. A return never crosses into the next episode:
        at the last row before an ``is_first`` it is the bootstrap value itself. Returns the
        weighted loss (``replay_scale`` applied)."""
        feat = states["feat"].detach()
        fn = self.__dict__.get("_compiled_replay") or self._replay_terms
        return fn(feat, states["reward"], states["is_terminal"], states["is_first"],
                  None if imagined_return is None else imagined_return.detach())

    def _replay_terms(self, feat: torch.Tensor, reward: torch.Tensor, is_terminal: torch.Tensor,
                      is_first: torch.Tensor, imagined_return: torch.Tensor | None) -> torch.Tensor:
        logits = self.critic(feat)
        boot = (self.critic.mean(logits) if imagined_return is None else imagined_return).detach()
        reward = reward.to(feat.dtype)
        cont = (~is_terminal).to(feat.dtype)
        next_first = is_first[:, 1:]
        # R_t = r_{t+1} + g c_{t+1} (...): with r_{t+1} := boot_t and c_{t+1} := 0, R_t = boot_t
        reward_next = torch.where(next_first, boot[:, :-1], reward[:, 1:])
        cont_next = torch.where(next_first, torch.zeros_like(cont[:, 1:]), cont[:, 1:])
        est = self.value_estimator
        ret = lambda_returns(reward_next, cont_next, boot, discount=est.gamma, lmbda=est.lmbda)
        valid = cont[:, :-1]  # terminal rows have no future to regress on
        return self.replay_scale * (self.critic.loss(logits[:, :-1], ret) * valid).mean()


class DreamerPolicyLoss(_DreamerLoss):
    """Actor loss on imagined trajectories.

    Args:
        actor: :class:`~.nets.DiscreteActor` / :class:`~.nets.ContinuousActor` (or any module
            ``actor(feat, **actor_inputs) -> dist`` with ``log_prob``/``entropy``).
        entropy_coef: entropy bonus (paper 3e-4).
        actor_grad: ``"reinforce"`` (score function, stop-gradient advantage; any action space) or
            ``"dynamics"`` (backprop of the normalised return through the imagined dynamics;
            continuous actions, needs the trajectory imagined with ``grad=True`` and ``critic``).
        critic: the critic head, only for ``actor_grad="dynamics"``.
        return_decay, return_low_q, return_high_q: return normalisation (EMA 0.99, P5, P95).
        actor_input_keys: extra per-step trajectory entries passed to the actor by name (e.g.
            ``("action_mask",)``), as imagination recorded them.
        actor_context_keys: per-trajectory constants passed to the actor as ``[N, ...]`` (e.g.
            encoded node embeddings).
        group_size: ``1``: the advantage of step ``t`` is ``R_t - V(s_t)`` (the paper). ``K > 1``
            (REINFORCE only): the trajectories come in groups of ``K`` consecutive rows imagined from
            one start (:class:`~.imagination.ImaginationModule` ``group_size``) and every step of a
            trajectory gets ``R_0 - mean of R_0 over the other K - 1`` (a leave-one-out group
            baseline, as POMO's shared baseline in routing RL): the critic then only bootstraps the
            returns and no longer judges single moves.

    ``forward(traj)`` needs ``feat``, ``action`` and, from :class:`DreamerCriticLoss`, ``value``,
    ``lambda_return`` and ``weight`` (``[N, H+1]``). Returns ``loss_actor`` and diagnostics
    (``entropy``, ``return_scale``, ``advantage_*``, ``log_prob_min``).
    """

    @dataclass
    class _AcceptedKeys:
        """feat / action: imagined ``[N, H+1, .]``; value / lambda_return / weight: ``[N, H+1]``."""

        feat: NestedKey = "feat"
        action: NestedKey = "action"
        value: NestedKey = "value"
        lambda_return: NestedKey = "lambda_return"
        weight: NestedKey = "weight"
        reward: NestedKey = "reward"
        cont: NestedKey = "cont"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(self, actor: nn.Module, *, entropy_coef: float = 3e-4,
                 actor_grad: Literal["reinforce", "dynamics"] = "reinforce", critic: TwoHotHead | None = None,
                 return_decay: float = 0.99, return_low_q: float = 0.05, return_high_q: float = 0.95,
                 actor_input_keys: tuple[str, ...] = (), actor_context_keys: tuple[str, ...] = (),
                 group_size: int = 1) -> None:
        super().__init__()
        if actor_grad not in ("reinforce", "dynamics"):
            raise ValueError(f"actor_grad must be 'reinforce' or 'dynamics', got '{actor_grad}'")
        if int(group_size) != group_size or group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {group_size}")
        if group_size > 1 and actor_grad != "reinforce":
            raise ValueError("group_size > 1 (group baseline) needs actor_grad='reinforce'")
        self.group_size = int(group_size)
        if actor_grad == "dynamics":
            if getattr(actor, "discrete", False):
                raise ValueError("actor_grad='dynamics' needs continuous actions; use 'reinforce' for discrete ones")
            if critic is None:
                raise ValueError("actor_grad='dynamics' needs the critic to bootstrap the returns")
        self.actor = actor
        self.entropy_coef = float(entropy_coef)
        self.actor_grad = actor_grad
        # not a submodule: the critic belongs to the DreamerCriticLoss and must not be trained from here
        self._critic = [critic]
        self.return_normalizer = ReturnNormalizer(return_decay, return_low_q, return_high_q)
        self.actor_input_keys = tuple(actor_input_keys)
        self.actor_context_keys = tuple(actor_context_keys)

    def forward(self, traj: TensorDictBase) -> TensorDictBase:
        k = self.tensor_keys
        weight = _require(traj, k.weight, "DreamerPolicyLoss").detach()[:, :-1]
        feat = _require(traj, k.feat, "DreamerPolicyLoss")
        inputs = {name: _require(traj, name, "DreamerPolicyLoss")[:, :-1] for name in self.actor_input_keys}
        # per-trajectory constants (stored as [N, H+1] views by imagination): the actor gets [N, ...]
        inputs.update({name: per_trajectory(_require(traj, name, "DreamerPolicyLoss")) for name in self.actor_context_keys})
        action = traj.get(k.action)[:, :-1]
        if self.actor_grad == "reinforce":
            ret = traj.get(k.lambda_return)[:, :-1].detach()
            value = traj.get(k.value)[:, :-1].detach()
            # the percentiles over all N * H returns (with stop_when_done's padding: zeros)
            scale = self.return_normalizer.update(ret) if self.training else self.return_normalizer.scale
            fn = self.__dict__.get("_compiled_reinforce") or self._reinforce_terms
            # without per-step actor inputs, the actor runs on all H+1 (contiguous) states and its
            # distribution is sliced to the H acted ones: with the backward, 11% faster compiled
            # than running on the (non-contiguous) slice (forward-only heads are the other way)
            full = not self.actor_input_keys
            steps = imagined_steps(traj)
            if steps is None:
                states = feat.detach() if full else feat[:, :-1].detach()
                horizon = None
            else:  # the actor runs on the imagined steps only, eagerly (see imagined_steps)
                fn, horizon = self._reinforce_terms, ret.shape[1]
                states = feat[:, :steps + 1 if full else steps].detach().contiguous()
                action, ret, value, weight = (x[:, :steps] for x in (action, ret, value, weight))
                inputs.update({name: inputs[name][:, :steps] for name in self.actor_input_keys})
            loss_actor, entropy, advantage, log_prob = fn(states, action.detach(), ret, value, scale, weight, inputs,
                                                          full, horizon)
        else:
            dist = self.actor(feat[:, :-1].detach(), **inputs)
            entropy = dist.entropy()
            critic = self._critic[0]
            value_all = critic.mean(critic(feat))  # gradient flows into feat, not used for critic params
            ret = self.value_estimator(traj.get(k.reward), traj.get(k.cont).detach(), value_all)
            scale = self.return_normalizer.update(ret) if self.training else self.return_normalizer.scale
            advantage = ret / scale
            log_prob = dist.log_prob(action.detach())
            loss_actor = -((advantage + self.entropy_coef * entropy) * weight).mean()
        scale = scale.detach().clone() if torch.is_tensor(scale) else torch.tensor(float(scale))
        diag = dict(zip(self.DIAGNOSTICS, self.diagnostics(entropy, scale, advantage, log_prob)))
        return TensorDict({"loss_actor": loss_actor, **diag}, batch_size=[])

    DIAGNOSTICS = ("entropy", "return_scale", "advantage_mean", "advantage_std", "log_prob_min")

    @staticmethod
    @torch.no_grad()
    def diagnostics(entropy: torch.Tensor, scale: torch.Tensor, advantage: torch.Tensor,
                    log_prob: torch.Tensor) -> list[torch.Tensor]:
        """The values named by :attr:`DIAGNOSTICS` (shared with the fused update's graph)."""
        return [entropy.mean(), scale, advantage.mean(), advantage.std(), log_prob.min()]

    def _reinforce_terms(self, feat: torch.Tensor, action: torch.Tensor, ret: torch.Tensor, value: torch.Tensor,
                         scale: torch.Tensor, weight: torch.Tensor, inputs: dict[str, torch.Tensor],
                         full: bool = False, horizon: int | None = None):
        """REINFORCE loss on plain tensors (compilable): ``(loss, entropy, advantage, log_prob)``.
        ``full``: ``feat`` holds all H+1 states and the distribution is sliced to the first H
        (``dist[:, :-1]``; a distribution without ``__getitem__`` is recomputed on the slice).
        ``horizon``: the inputs hold the first ``L`` of ``horizon`` steps (:func:`imagined_steps`;
        the rest have zero weight) and the loss is the mean over ``N * horizon`` steps."""
        dist = self.actor(feat, **inputs)
        if full:
            # a custom actor's distribution may not support slicing: then run it on the slice
            dist = dist[:, :-1] if hasattr(type(dist), "__getitem__") else self.actor(feat[:, :-1], **inputs)
        entropy = dist.entropy()
        k = self.group_size
        if k > 1:
            if ret.shape[0] % k:
                raise ValueError(f"group baseline: {ret.shape[0]} imagined trajectories are not groups of "
                                 f"{k}; imagine with ImaginationModule(group_size={k})")
            first = ret[:, 0].reshape(-1, k)
            others = (first.sum(1, keepdim=True) - first) / (k - 1)
            advantage = ((first - others).reshape(-1, 1).expand_as(ret) / scale).detach()
        else:
            advantage = ((ret - value) / scale).detach()
        log_prob = dist.log_prob(action)
        per_step = (log_prob * advantage + self.entropy_coef * entropy) * weight
        loss_actor = -(per_step.mean() if horizon is None else per_step.sum() / (per_step.shape[0] * horizon))
        return loss_actor, entropy, advantage, log_prob

    def enable_compile(self, **kwargs) -> None:
        """``torch.compile`` the REINFORCE tensor core (forward and backward). Same values as eager."""
        self.__dict__["_compiled_reinforce"] = torch.compile(self._reinforce_terms, dynamic=False, **kwargs)
