"""Multi-agent PPO: a tanh-Gaussian policy, a ``LossModule`` equal to TorchRL's ``ClipPPOLoss``,
and a minibatch update that runs on plain tensors.

What is reused from TorchRL and what is not (and why):

* **Reused:** ``LossModule`` (base class, ``_AcceptedKeys``/``set_keys``), ``GAE`` (value
  estimator, computed once per batch on TensorDicts), ``TensorDictModule`` wiring, and in
  ``impl="torchrl"`` mode ``ClipPPOLoss`` + ``ReplayBuffer`` + ``ProbabilisticActor``/``TanhNormal``
  exactly as TorchRL's multi-agent PPO tutorial uses them.
* **Not reused in the hot loop (``impl="fused"``, the default):** the 450 minibatch steps per
  iteration of the VMAS settings index flat tensors and call :meth:`MultiAgentPPOLoss.losses`
  directly. The objective, critic and entropy terms are the same as ``ClipPPOLoss`` with
  ``TanhNormal`` (``tests/mappo/test_mappo_ppo.py`` checks the values against ``ClipPPOLoss`` on the same
  batch); what is saved is per-minibatch TensorDict/distribution overhead, and ``atanh`` of
  stored actions: the pre-squash sample is stored at collection time instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import InteractionType, TensorDictModule
from tensordict.nn.probabilistic import interaction_type
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives import ClipPPOLoss, LossModule, ValueEstimators
from torchrl.objectives.value import GAE

from torchrl_dreamer.distributed import SINGLE, DataParallel, total_count
from torchrl_dreamer.guards import NonFiniteError, check_parameters_finite
from .mappo_networks import AgentGroupMLP, TanhNormalHead

__all__ = [
    "TanhNormalPolicy",
    "MultiAgentPPOLoss",
    "ppo_update",
    "make_torchrl_clip_ppo_loss",
    "torchrl_ppo_update",
]


class TanhNormalPolicy(nn.Module):
    """Backbone + :class:`TanhNormalHead`; samples or takes the mode depending on the exploration
    type set by the caller (``torchrl.envs.utils.set_exploration_type``).

    ``forward(obs) -> (action, action_pretanh, log_prob)`` with ``log_prob`` the full log-density
    of ``action`` (Jacobian included), i.e. what TorchRL stores as ``sample_log_prob``.
    """

    def __init__(self, backbone: AgentGroupMLP, head: TanhNormalHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def distribution_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.params(self.backbone(obs))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loc, scale = self.distribution_params(obs)
        mode = interaction_type() in (InteractionType.DETERMINISTIC, InteractionType.MODE, InteractionType.MEAN)
        u = loc if mode else loc + scale * torch.randn_like(loc)
        return self.head.squash(u), u, self.head.log_prob(u, loc, scale)


class _LocScale(nn.Module):
    """Exposes ``(loc, scale)`` of a :class:`TanhNormalPolicy` for TorchRL's ``ProbabilisticActor``."""

    def __init__(self, policy: TanhNormalPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.distribution_params(obs)


class MultiAgentPPOLoss(LossModule):
    """Clipped PPO for (multi-agent) tanh-Gaussian policies, with the terms of ``ClipPPOLoss``.

    Args:
        policy: the :class:`TanhNormalPolicy` (the same module the collector acts with).
        critic: a network ``obs [*B, A, D] -> value [*B, A, 1]``.
        clip_epsilon: ratio clip.
        entropy_coef: weight of the entropy bonus (``loss_entropy = -coef * entropy``); the
            entropy of a tanh-Gaussian has no closed form and is estimated from one
            reparameterised sample, as ``ClipPPOLoss`` does.
        critic_coef: weight of the critic loss.
        critic_loss: ``"smooth_l1"`` (TorchRL's default) or ``"l2"``.
        normalize_advantage: standardise advantages per minibatch.

    ``forward(td)`` returns ``loss_objective``, ``loss_critic``, ``loss_entropy`` and detached
    diagnostics (``entropy``, ``clip_fraction``, ``kl_approx``, ``action_std``). Discount and lambda are set with
    ``make_value_estimator(ValueEstimators.GAE, gamma=..., lmbda=...)``.
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read by the loss (override with ``set_keys``).

        observation: per-agent observations ``[*B, A, D]``.
        action_pretanh: the pre-squash Gaussian sample stored by the policy ``[*B, A, act]``.
        sample_log_prob: log-prob of the action when it was collected ``[*B, A]``.
        advantage / value_target: written by the value estimator ``[*B, A, 1]``.
        value: critic output key ``[*B, A, 1]``.
        reward / done / terminated: read by the value estimator under ``"next"``.
        """

        observation: NestedKey = ("agents", "observation")
        action_pretanh: NestedKey = ("agents", "action_pretanh")
        sample_log_prob: NestedKey = ("agents", "action_log_prob")
        advantage: NestedKey = ("agents", "advantage")
        value_target: NestedKey = ("agents", "value_target")
        value: NestedKey = ("agents", "state_value")
        reward: NestedKey = ("agents", "reward")
        done: NestedKey = ("agents", "done")
        terminated: NestedKey = ("agents", "terminated")

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = ValueEstimators.GAE

    def __init__(
        self,
        policy: TanhNormalPolicy,
        critic: nn.Module,
        *,
        clip_epsilon: float = 0.2,
        entropy_coef: float = 1e-4,
        critic_coef: float = 1.0,
        critic_loss: Literal["smooth_l1", "l2"] = "smooth_l1",
        normalize_advantage: bool = False,
    ) -> None:
        super().__init__()
        if critic_loss not in ("smooth_l1", "l2"):
            raise ValueError(f"critic_loss must be 'smooth_l1' or 'l2', got '{critic_loss}'")
        self.policy = policy
        self.critic = critic
        self.clip_epsilon = float(clip_epsilon)
        self.entropy_coef = float(entropy_coef)
        self.critic_coef = float(critic_coef)
        self.critic_loss_type = critic_loss
        self.normalize_advantage = normalize_advantage
        self._critic_module: TensorDictModule | None = None
        self._compiled_losses: Callable | None = None

    def enable_compile(self) -> None:
        """Compile :meth:`losses` (forward and, through AOTAutograd, backward) with ``torch.compile``.

        Measured on the 2-core CPU machine at the VMAS navigation settings: 12.9 -> 9.5 ms per
        minibatch step with 2 threads, no gain with 1 thread, ~12 s one-time compile. Optional,
        because compile has made other stacks slower on CPU: measure first.
        """
        self._compiled_losses = torch.compile(self.losses, dynamic=False)

    @property
    def losses_fn(self) -> Callable[..., dict[str, torch.Tensor]]:
        """:meth:`losses`, compiled if :meth:`enable_compile` was called."""
        return self._compiled_losses if self._compiled_losses is not None else self.losses

    @property
    def critic_module(self) -> TensorDictModule:
        """The critic wired to the current ``observation``/``value`` keys (used by GAE)."""
        if self._critic_module is None or self._critic_module.in_keys != [self.tensor_keys.observation]:
            self._critic_module = TensorDictModule(
                self.critic, in_keys=[self.tensor_keys.observation], out_keys=[self.tensor_keys.value]
            )
        return self._critic_module

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(
                advantage=self.tensor_keys.advantage,
                value_target=self.tensor_keys.value_target,
                value=self.tensor_keys.value,
                reward=self.tensor_keys.reward,
                done=self.tensor_keys.done,
                terminated=self.tensor_keys.terminated,
            )
        self._critic_module = None

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams) -> "MultiAgentPPOLoss":
        value_type = value_type or self.default_value_estimator
        if value_type is not ValueEstimators.GAE:
            raise NotImplementedError(f"MultiAgentPPOLoss supports GAE only, got {value_type}")
        hp = {"gamma": 0.99, "lmbda": 0.95, **hyperparams}
        self._value_estimator = GAE(value_network=self.critic_module, **hp)
        self._forward_value_estimator_keys()
        # the estimator holds a reference to the critic module; keep the one it was built with
        self._critic_module = self._value_estimator.value_network
        return self

    @property
    def value_estimator(self) -> GAE:
        if self._value_estimator is None:
            self.make_value_estimator()
        return self._value_estimator

    @value_estimator.setter
    def value_estimator(self, value) -> None:
        self._value_estimator = value

    @torch.no_grad()
    def compute_advantage(self, batch: TensorDictBase) -> TensorDictBase:
        """Writes advantage and value target into ``batch`` (in place) with the current critic."""
        self.value_estimator(batch)
        return batch

    def losses(
        self,
        obs: torch.Tensor,
        action_pretanh: torch.Tensor,
        old_log_prob: torch.Tensor,
        advantage: torch.Tensor,
        value_target: torch.Tensor,
        advantage_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The PPO terms on plain tensors.

        Shapes: ``obs [N, A, D]``, ``action_pretanh [N, A, act]``, ``old_log_prob [N, A]``,
        ``advantage [N, A, 1]``, ``value_target [N, A, 1]``. ``advantage_stats``: the ``(mean, std)``
        to standardise with instead of this minibatch's own (data-parallel ranks use the global ones).
        """
        head = self.policy.head
        loc, scale = self.policy.distribution_params(obs)
        # The squash Jacobian depends on the stored pre-tanh sample only: same for old and new.
        log_prob = head.gaussian_log_prob(action_pretanh, loc, scale) - head.log_abs_det_jacobian(action_pretanh)
        log_ratio = (log_prob - old_log_prob).unsqueeze(-1)
        if self.normalize_advantage and advantage_stats is not None:
            advantage = (advantage - advantage_stats[0]) / advantage_stats[1].clamp_min(1e-6)
        elif self.normalize_advantage and advantage.numel() > 1:
            advantage = (advantage - advantage.mean()) / advantage.std().clamp_min(1e-6)
        low, high = math.log1p(-self.clip_epsilon), math.log1p(self.clip_epsilon)
        log_ratio_clipped = log_ratio.clamp(low, high)
        gain = torch.minimum(log_ratio.exp() * advantage, log_ratio_clipped.exp() * advantage)
        loss_objective = -gain.mean()

        # Entropy estimate from one reparameterised sample (tanh-Gaussian has no closed form).
        sample = loc + scale * torch.randn_like(loc)
        entropy = -head.log_prob(sample, loc, scale)
        loss_entropy = -self.entropy_coef * entropy.mean()

        value = self.critic(obs)
        if self.critic_loss_type == "smooth_l1":
            critic_error = F.smooth_l1_loss(value, value_target, reduction="none")
        else:
            critic_error = (value - value_target).pow(2)
        loss_critic = self.critic_coef * critic_error.mean()
        with torch.no_grad():
            clip_fraction = (log_ratio_clipped != log_ratio).float().mean()
            kl_approx = ((log_ratio.exp() - 1) - log_ratio).mean()
        return {
            "loss_objective": loss_objective,
            "loss_critic": loss_critic,
            "loss_entropy": loss_entropy,
            "entropy": entropy.detach().mean(),
            "clip_fraction": clip_fraction,
            "kl_approx": kl_approx,
            "action_std": scale.detach().mean(),  # the Gaussian's std before the tanh squash
        }

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        keys = self.tensor_keys
        out = self.losses_fn(
            tensordict.get(keys.observation),
            tensordict.get(keys.action_pretanh),
            tensordict.get(keys.sample_log_prob),
            tensordict.get(keys.advantage),
            tensordict.get(keys.value_target),
        )
        return TensorDict(out, batch_size=[])


def _flat(batch: TensorDictBase, key: NestedKey) -> torch.Tensor:
    value = batch.get(key)
    return value.reshape(-1, *value.shape[batch.ndim :]).contiguous()


def _guarded_step(
    terms, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float,
    iteration: int | None, run_dir: str | None, dp: DataParallel = SINGLE,
) -> torch.Tensor:
    """Backward of the summed ``loss_*`` terms, gradient clipping, then the optimizer step unless
    the loss or the gradient norm is non-finite (then :class:`NonFiniteError`, step not taken).
    Returns the (detached) gradient norm before clipping."""
    total = terms["loss_objective"] + terms["loss_critic"] + terms["loss_entropy"]
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    dp.sync_gradients(params, average=True)  # torchrun: equal minibatch shares, so the mean is the full gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not bool(torch.isfinite(total) & torch.isfinite(grad_norm)):  # one sync per step
        bad = next((k for k in terms.keys() if not bool(torch.isfinite(terms[k]).all())), "grad_norm")
        name = f"loss/{bad.removeprefix('loss_')}" if bad.startswith("loss_") else f"diag/{bad}"
        raise NonFiniteError(name, iteration=iteration, run_dir=run_dir,
                             detail=" before the optimizer step (step not taken)")
    optimizer.step()
    check_parameters_finite(params, iteration=iteration, run_dir=run_dir)
    return grad_norm.detach()


def global_advantage_stats(advantage: torch.Tensor, dp: DataParallel) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) standard deviation of ``advantage`` over the minibatch shares of all ranks."""
    count, total = total_count(dp, [advantage.new_tensor(float(advantage.numel())), advantage.sum()])
    mean = total / count
    (squares,) = total_count(dp, [((advantage - mean) ** 2).sum()])
    return mean, (squares / (count - 1).clamp_min(1)).sqrt()


def ppo_update(
    loss: MultiAgentPPOLoss,
    batch: TensorDictBase,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    minibatch_size: int,
    max_grad_norm: float,
    iteration: int | None = None,
    run_dir: str | None = None,
    generator: torch.Generator | None = None,
    dp: DataParallel = SINGLE,
) -> dict[str, float]:
    """``epochs`` passes over ``batch`` (advantages already computed) in shuffled minibatches.

    ``dp`` (under ``torchrun``): ``batch`` and ``minibatch_size`` are this rank's shares; advantages
    are standardised with the statistics of the global minibatch and the gradients averaged over
    ranks before clipping, so every rank takes the one-process step on the global minibatch.

    Every minibatch permutation drops the remainder (like ``SamplerWithoutReplacement`` with
    ``drop_last``). Before each ``optimizer.step()`` the loss and the gradient norm are checked:
    a non-finite value raises :class:`NonFiniteError` and the step is not taken.

    Returns mean losses/diagnostics over all minibatches (``loss/*``, ``diag/*``).
    """
    keys = loss.tensor_keys
    obs = _flat(batch, keys.observation)
    action_pretanh = _flat(batch, keys.action_pretanh)
    old_log_prob = _flat(batch, keys.sample_log_prob)
    advantage = _flat(batch, keys.advantage)
    value_target = _flat(batch, keys.value_target)
    n = obs.shape[0]
    if minibatch_size > n:
        raise ValueError(f"minibatch_size {minibatch_size} is larger than the batch ({n} samples)")
    n_minibatches = n // minibatch_size
    params = [p for p in loss.parameters() if p.requires_grad]
    totals: dict[str, torch.Tensor] = {}
    grad_norm_total = torch.zeros((), device=obs.device)
    losses_fn = loss.losses_fn
    for _ in range(epochs):
        # One gather per epoch; minibatches are then contiguous slices (views, no copies).
        perm = torch.randperm(n, generator=generator, device="cpu").to(obs.device)
        shuffled = [t[perm] for t in (obs, action_pretanh, old_log_prob, advantage, value_target)]
        for i in range(n_minibatches):
            window = slice(i * minibatch_size, (i + 1) * minibatch_size)
            args = [t[window] for t in shuffled]
            stats = global_advantage_stats(args[3], dp) if dp.enabled and loss.normalize_advantage else None
            terms = losses_fn(*args, advantage_stats=stats) if stats is not None else losses_fn(*args)
            grad_norm = _guarded_step(terms, params, optimizer, max_grad_norm, iteration, run_dir, dp)
            grad_norm_total += grad_norm
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.detach()
    n_steps = max(1, epochs * n_minibatches)
    if dp.enabled and totals:  # every rank's means over its share: average them once
        totals = dict(zip(totals, (v / dp.world_size for v in total_count(dp, totals.values()))))
    out = {}
    for name, value in totals.items():
        prefix = "loss/" if name.startswith("loss_") else "diag/"
        out[prefix + name.removeprefix("loss_")] = float(value) / n_steps
    out["diag/grad_norm"] = float(grad_norm_total) / n_steps
    out["diag/optimizer_steps"] = float(n_steps)
    return out


# --- the plain TorchRL path (impl="torchrl"): ClipPPOLoss + ReplayBuffer, for comparison -------


def make_torchrl_clip_ppo_loss(
    policy: TanhNormalPolicy,
    critic: nn.Module,
    *,
    group: str = "agents",
    action_key: NestedKey = ("agents", "action"),
    clip_epsilon: float = 0.2,
    entropy_coef: float = 1e-4,
    critic_coef: float = 1.0,
    critic_loss: str = "smooth_l1",
    normalize_advantage: bool = False,
) -> ClipPPOLoss:
    """TorchRL's ``ClipPPOLoss`` around the same policy and critic modules (shared parameters)."""
    from torchrl.modules import ProbabilisticActor, TanhNormal

    head = policy.head
    loc_scale = TensorDictModule(
        _LocScale(policy), in_keys=[(group, "observation")], out_keys=[(group, "loc"), (group, "scale")]
    )
    actor = ProbabilisticActor(
        module=loc_scale,
        in_keys=[(group, "loc"), (group, "scale")],
        out_keys=[action_key],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": head.low, "high": head.low + 2 * head.half_range},
        return_log_prob=True,
        log_prob_key=(group, "action_log_prob"),
    )
    critic_module = TensorDictModule(critic, in_keys=[(group, "observation")], out_keys=[(group, "state_value")])
    loss = ClipPPOLoss(
        actor_network=actor,
        critic_network=critic_module,
        clip_epsilon=clip_epsilon,
        entropy_coeff=entropy_coef,
        critic_coeff=critic_coef,
        loss_critic_type=critic_loss,
        normalize_advantage=normalize_advantage,
    )
    loss.set_keys(
        reward=(group, "reward"),
        action=action_key,
        sample_log_prob=(group, "action_log_prob"),
        value=(group, "state_value"),
        advantage=(group, "advantage"),
        value_target=(group, "value_target"),
        done=(group, "done"),
        terminated=(group, "terminated"),
    )
    return loss


def torchrl_ppo_update(
    loss: ClipPPOLoss,
    batch: TensorDictBase,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    minibatch_size: int,
    max_grad_norm: float,
    iteration: int | None = None,
    run_dir: str | None = None,
) -> dict[str, float]:
    """The tutorial-style minibatch loop: ``ReplayBuffer`` + ``SamplerWithoutReplacement`` + ``ClipPPOLoss``."""
    from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement

    flat = batch.reshape(-1)
    buffer = ReplayBuffer(
        storage=LazyTensorStorage(flat.shape[0], device=flat.device),
        sampler=SamplerWithoutReplacement(),
        batch_size=minibatch_size,
    )
    buffer.extend(flat)
    params = [p for p in loss.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    n_steps = 0
    for _ in range(epochs):
        for _ in range(flat.shape[0] // minibatch_size):
            out = loss(buffer.sample())
            _guarded_step(out, params, optimizer, max_grad_norm, iteration, run_dir)
            n_steps += 1
            for name in ("loss_objective", "loss_critic", "loss_entropy", "entropy", "clip_fraction", "kl_approx"):
                if name in out.keys():
                    totals[name] = totals.get(name, 0.0) + float(out[name].detach().mean())
    result = {}
    for name, value in totals.items():
        prefix = "loss/" if name.startswith("loss_") else "diag/"
        result[prefix + name.removeprefix("loss_")] = value / max(1, n_steps)
    result["diag/optimizer_steps"] = float(n_steps)
    return result
