"""One DreamerV3 gradient update, as a named object so it can be profiled, timed and compiled.

``DreamerUpdate(batch)`` runs: world-model loss on a replayed ``[B, T]`` slice -> imagination from
its (detached) posterior states -> critic loss -> actor loss -> non-finite guard -> optimizer step
-> slow-critic EMA. The world-model graph and the actor/critic graph are disjoint (imagination
starts from detached states), so they are back-propagated separately; that costs nothing extra
and gives the time breakdown the throughput benchmark reports.

Optimisation reuses TorchRL's ``DreamerV3Optimizer`` (LaProp: RMS-normalised gradient with
momentum, plus adaptive gradient clipping at 0.3 of each parameter tensor's norm), checked
against the DreamerV3 reference (``tests/dreamer/test_dreamer_losses.py``), with one parameter group per
module so each gets its own learning rate.
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from tensordict import TensorDictBase
from torchrl.trainers.algorithms.dreamer_v3 import DreamerV3Optimizer

from ..guards import NonFiniteError, check_parameters_finite
from ..trainer import lr_multiplier
from .agent import DreamerAgent
from .imagination import ImaginationModule
from .losses import DreamerPolicyLoss, DreamerCriticLoss, DreamerWorldModelLoss

__all__ = ["make_optimizer", "set_learning_rates", "CompiledDreamerV3Optimizer", "DreamerUpdate"]


def _laprop_update(params: list[torch.Tensor], grads: list[torch.Tensor], rms: list[torch.Tensor],
                   momentum: list[torch.Tensor], scalars: torch.Tensor, group_of: tuple[int, ...], agc: float,
                   parameter_norm_min: float, beta1: float, beta2: float, eps: float) -> None:
    """The arithmetic of TorchRL's ``DreamerV3Optimizer.step`` (float32 parameters), written per
    tensor so that ``torch.compile`` fuses it. ``scalars [groups, 3]`` holds each param group's
    step-dependent ``(lr * warmup, rms correction, momentum correction)`` and ``group_of[i]`` the
    row of tensor ``i``: one graph serves every step and every group sharing the other
    hyper-parameters."""
    for i, (p, g, v, m) in enumerate(zip(params, grads, rms, momentum)):
        lr, rms_correction, momentum_correction = scalars[group_of[i], 0], scalars[group_of[i], 1], scalars[group_of[i], 2]
        g = g.float()
        if agc:
            max_norm = torch.linalg.vector_norm(p.float()).clamp_min(parameter_norm_min) * agc
            g = g * (max_norm / torch.maximum(torch.linalg.vector_norm(g), max_norm))
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m.mul_(beta1).add_(g / ((v / rms_correction).sqrt() + eps), alpha=1 - beta1)
        p.sub_(lr * (m / momentum_correction))


class CompiledDreamerV3Optimizer(DreamerV3Optimizer):
    """TorchRL's ``DreamerV3Optimizer`` (same hyper-parameters, state and ``state_dict``) with the
    update compiled into one graph for all param groups that share ``agc``/``betas``/``eps`` (the
    usual case: only the learning rates differ). On CPU the multi-tensor ``_foreach`` ops of the
    original run tensor by tensor (~15 ops x 63 tensors: ~3-5 ms per step at the benchmark sizes);
    the compiled update is tested equal to it (``tests/dreamer/test_dreamer_losses.py``). Parameters enter
    the graph as ``detach()``ed views of their own storage (updated in place, outside autograd).
    float32 parameters only (what the Dreamer networks use). ``compile_kwargs``: extra
    ``torch.compile`` arguments (e.g. :func:`~torchrl_dreamer.cpu.inductor_options`)."""

    def __init__(self, *args, compile_kwargs: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._update = torch.compile(_laprop_update, dynamic=False, **(compile_kwargs or {}))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            raise RuntimeError("DreamerV3 optimizer received no parameter gradients.")
        # one compiled call per set of shared hyper-parameters (one set unless groups differ beyond lr)
        buckets: dict[tuple, list] = {}
        rows = []
        for group in self.param_groups:
            group["step"] += 1
            step, warmup_steps = group["step"], group["warmup_steps"]
            warmup = min(1.0, (step - 1) / warmup_steps) if warmup_steps else 1.0
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.dtype != torch.float32 for p in params):
                raise TypeError("CompiledDreamerV3Optimizer supports float32 parameters only")
            for p in params:
                state = self.state[p]
                if not state:
                    state["rms"] = torch.zeros_like(p, dtype=torch.float32)
                    state["momentum"] = torch.zeros_like(p, dtype=torch.float32)
            key = (group["agc"], group["parameter_norm_min"], group["beta1"], group["beta2"], group["eps"],
                   params[0].device)
            buckets.setdefault(key, []).append((len(rows), params))
            rows.append([group["lr"] * warmup, 1 - group["beta2"] ** step, 1 - group["beta1"] ** step])
        scalars = torch.tensor(rows, dtype=torch.float32)
        for (agc, norm_min, beta1, beta2, eps, device), members in buckets.items():
            params = [p for _, ps in members for p in ps]
            # rows of this bucket, renumbered from 0
            rows_here = [row for row, _ in members]
            group_of = tuple(j for j, (_, ps) in enumerate(members) for _ in ps)
            self._update([p.detach() for p in params], [p.grad for p in params],
                         [self.state[p]["rms"] for p in params], [self.state[p]["momentum"] for p in params],
                         scalars[rows_here].to(device, non_blocking=True), group_of, agc, norm_min, beta1, beta2, eps)
        return loss


def make_optimizer(agent: DreamerAgent, *, world_model_lr: float = 4e-5, actor_lr: float = 4e-5,
                   critic_lr: float = 4e-5, agc: float = 0.3, eps: float = 1e-20, warmup_steps: int = 1000,
                   beta1: float = 0.9, beta2: float = 0.999, compile: bool = False,
                   compile_kwargs: dict | None = None) -> DreamerV3Optimizer:
    """TorchRL's ``DreamerV3Optimizer`` with param groups ``world_model``, ``actor``, ``critic``
    (``compile=True``: :class:`CompiledDreamerV3Optimizer`, the same update as one compiled graph,
    compiled with ``compile_kwargs``)."""
    groups = [
        {"params": list(agent.world_model.parameters()), "lr": world_model_lr, "name": "world_model"},
        {"params": list(agent.actor.parameters()), "lr": actor_lr, "name": "actor"},
        {"params": list(agent.critic.parameters()), "lr": critic_lr, "name": "critic"},
    ]
    kwargs = dict(lr=world_model_lr, agc=agc, eps=eps, warmup_steps=warmup_steps, beta1=beta1, beta2=beta2)
    if compile:
        return CompiledDreamerV3Optimizer(groups, compile_kwargs=compile_kwargs, **kwargs)
    return DreamerV3Optimizer(groups, **kwargs)


def set_learning_rates(optimizer: torch.optim.Optimizer, optim_cfg, progress: float) -> float:
    """Sets each param group's rate (``world_model``, ``actor``, ``critic``) to its configured rate in
    ``optim_cfg`` (an :class:`~torchrl_dreamer.dreamer.config.OptimConfig`) times the multiplier of
    ``optim_cfg.lr_schedule`` at ``progress`` (0..1, :func:`torchrl_dreamer.trainer.run_progress`);
    returns the multiplier. The optimizer's warm-up still scales these rates over its first
    ``warmup_steps`` updates. The compiled optimizer reads the rates as tensor inputs: changing them
    does not recompile."""
    oc = optim_cfg
    mult = lr_multiplier(oc.lr_schedule, progress, decay_start=oc.lr_decay_start, final_fraction=oc.lr_final_fraction)
    base = {"world_model": oc.world_model_lr, "actor": oc.actor_lr, "critic": oc.critic_lr}
    for group in optimizer.param_groups:
        group["lr"] = base[group["name"]] * mult
    return mult


def terminal_calibration(row: dict[str, float]) -> dict[str, float]:
    """Turns the window means of ``diag/terminal_rows`` and ``diag/continue_prob_terminal_sum`` (both
    per update, over the same updates) into ``diag/continue_prob_at_terminal``: the continue head's
    mean probability on replayed terminal rows (0 is right; imagination multiplies its returns by
    it), NaN when the window saw no terminal row, and ``diag/terminal_rows_per_update``."""
    rows, total = row.pop("diag/terminal_rows", None), row.pop("diag/continue_prob_terminal_sum", None)
    if rows is not None and total is not None:
        row["diag/continue_prob_at_terminal"] = total / rows if rows > 0 else math.nan
        row["diag/terminal_rows_per_update"] = rows
    return row


def _grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class DreamerUpdate:
    """Callable that performs one update and returns detached metrics (tensors; convert lazily).

    Args:
        agent: the networks.
        world_model_loss, critic_loss, actor_loss: the three ``LossModule``s.
        imagination: the :class:`ImaginationModule` (horizon, start subset, hooks).
        optimizer: from :func:`make_optimizer`.
        timing: record ``time/update_*`` seconds per phase (CPU wall clock).
    """

    def __init__(self, agent: DreamerAgent, world_model_loss: DreamerWorldModelLoss, critic_loss: DreamerCriticLoss,
                 actor_loss: DreamerPolicyLoss, imagination: ImaginationModule, optimizer: torch.optim.Optimizer,
                 *, timing: bool = True) -> None:
        self.agent = agent
        # the losses hold buffers of their own (the actor's return-scale EMA, slow-critic copies): put them
        # where the networks are, so that ``agent.to("cuda")`` before building the update is enough
        device = next(agent.parameters()).device
        for module in (world_model_loss, critic_loss, actor_loss, imagination):
            module.to(device)
        self.world_model_loss, self.critic_loss, self.actor_loss = world_model_loss, critic_loss, actor_loss
        self.imagination, self.optimizer, self.timing = imagination, optimizer, timing
        self.groups = {g.get("name", str(i)): g["params"] for i, g in enumerate(optimizer.param_groups)}
        # checked after every optimizer step: an infinite learning rate must not reach a checkpoint
        self.parameters_to_check = [p for g in optimizer.param_groups for p in g["params"]]
        self.dynamics_grad = actor_loss.actor_grad == "dynamics"
        self._compiled_actor_critic = None

    def enable_compile(self, **kwargs) -> None:
        """``torch.compile`` the critic, return-normalisation, actor (REINFORCE) and replay-value
        terms as *one* graph, forward and backward (:meth:`_actor_critic_core`), instead of the
        losses' three compiled cores with eager code between them (TensorDicts, the return
        quantiles, diagnostics) and three compiled backward calls. Same values as the losses'
        own ``forward`` (tested). Used when the actor is REINFORCE without per-step actor inputs
        (no action masks or contexts: the recipes' gym envs); otherwise the losses run as usual
        (compile those with their own ``enable_compile``)."""
        self._compiled_actor_critic = torch.compile(self._actor_critic_core, dynamic=False, **kwargs)

    def _fusable(self) -> bool:
        a = self.actor_loss
        return (self._compiled_actor_critic is not None and a.actor_grad == "reinforce" and not a.actor_input_keys
                and not a.actor_context_keys)

    def _actor_critic_core(self, feat: torch.Tensor, reward: torch.Tensor, cont: torch.Tensor, action: torch.Tensor,
                           replay: tuple[torch.Tensor, ...] | None, training: bool):
        """Critic loss, return normalisation, REINFORCE actor loss and (``replay``: the replayed
        ``(feat, reward, is_terminal, is_first)``) the replay-value loss on plain tensors; the same
        calls as ``DreamerCriticLoss.forward``, ``DreamerPolicyLoss.forward`` and ``DreamerCriticLoss.replay_loss``."""
        critic, actor = self.critic_loss, self.actor_loss
        loss_critic, value, ret, weight, stats = critic._terms(feat, reward, cont)
        norm = actor.return_normalizer
        scale = norm.update(ret) if training else norm.scale
        loss_actor, entropy, advantage, log_prob = actor._reinforce_terms(
            feat, action[:, :-1], ret, value[:, :-1], scale, weight[:, :-1], {}, True)
        actor_diag = torch.stack(actor.diagnostics(entropy, scale, advantage, log_prob))
        loss_replay = None
        if replay is not None:
            r_feat, r_reward, r_terminal, r_first = replay
            loss_replay = critic._replay_terms(r_feat, r_reward, r_terminal, r_first,
                                               self._replay_bootstrap(ret[:, 0], r_feat.shape[:2]))
        return loss_critic, stats, loss_actor, actor_diag, loss_replay

    def _fused_actor_critic(self, traj: TensorDictBase, states: TensorDictBase):
        """:meth:`_actor_critic_core`, compiled, on the imagined trajectory; returns what the
        separate losses return (as dicts): ``(critic_td, actor_td, loss_replay or None)``."""
        critic, actor = self.critic_loss, self.actor_loss
        ck, ak = critic.tensor_keys, actor.tensor_keys
        replay = None
        if critic.replay_scale > 0:
            replay = (states["feat"].detach(), states["reward"], states["is_terminal"], states["is_first"])
        loss_critic, stats, loss_actor, actor_diag, loss_replay = self._compiled_actor_critic(
            traj.get(ck.feat).detach(), traj.get(ck.reward).detach(), traj.get(ck.cont).detach(),
            traj.get(ak.action).detach(), replay, actor.training)
        critic_td = {"loss_critic": loss_critic, **dict(zip(critic._STATS, stats.unbind(0)))}
        actor_td = {"loss_actor": loss_actor, **dict(zip(actor.DIAGNOSTICS, actor_diag.unbind(0)))}
        return critic_td, actor_td, loss_replay

    def __call__(self, batch: TensorDictBase, *, iteration: int | None = None, run_dir: str | None = None) -> dict[str, torch.Tensor]:
        clock = time.perf_counter
        t0 = clock()
        wm_td, states = self.world_model_loss(batch)
        wm_total = sum(v for k, v in wm_td.items() if k.startswith("loss_"))
        self._check({f"loss/{k[5:]}": v for k, v in wm_td.items() if k.startswith("loss_")}, iteration, run_dir)
        self.optimizer.zero_grad(set_to_none=True)
        wm_total.backward()
        t1 = clock()
        traj = self.imagination(states)
        t2 = clock()
        if self._fusable():
            critic_td, actor_td, loss_replay = self._fused_actor_critic(traj, states)
        else:
            critic_td, targets = self.critic_loss(traj)
            actor_td = self.actor_loss(traj.update(targets))  # traj is our own fresh TensorDict
            loss_replay = self._replay_value_loss(states, traj) if self.critic_loss.replay_scale > 0 else None
        ac_losses = {"loss/critic": critic_td["loss_critic"], "loss/actor": actor_td["loss_actor"]}
        if loss_replay is not None:
            ac_losses["loss/replay_value"] = loss_replay
        self._check(ac_losses, iteration, run_dir)
        if self.dynamics_grad:
            # the actor's gradient flows through the world model and the critic: take it for the
            # actor's parameters only, so neither is trained by the actor objective
            actor_params = list(self.agent.actor.parameters())
            grads = torch.autograd.grad(actor_td["loss_actor"], actor_params, allow_unused=True)
            for p, g in zip(actor_params, grads):
                p.grad = g
            sum(v for k, v in ac_losses.items() if k != "loss/actor").backward()
        else:
            sum(ac_losses.values()).backward()
        norms = {f"diag/grad_norm/{name}": _grad_norm(params) for name, params in self.groups.items()}
        self._check(norms, iteration, run_dir, what="gradient norm")
        self.optimizer.step()
        check_parameters_finite(self.parameters_to_check, iteration=iteration, run_dir=run_dir)
        self.critic_loss.update_slow_critic()
        t3 = clock()

        metrics: dict[str, torch.Tensor] = {"loss/world_model": wm_total.detach()}
        for k, v in wm_td.items():
            metrics[f"loss/{k[5:]}" if k.startswith("loss_") else f"diag/{k}"] = v.detach()
        for td in (critic_td, actor_td):
            for k, v in td.items():
                if k.startswith("loss_"):
                    metrics[f"loss/{k[5:]}"] = v.detach()
                else:
                    metrics[f"diag/{'actor_' if k == 'entropy' else ''}{k}"] = v
        if "loss/replay_value" in ac_losses:
            metrics["loss/replay_value"] = ac_losses["loss/replay_value"].detach()
        metrics.update(norms)
        mask_accuracy = getattr(self.imagination.hooks, "last_accuracy", None)
        if mask_accuracy is not None:
            metrics["diag/imagined_mask_accuracy"] = mask_accuracy
        if self.timing:
            metrics.update({"time/update_world_model_s": torch.tensor(t1 - t0),
                            "time/update_imagination_s": torch.tensor(t2 - t1),
                            "time/update_actor_critic_s": torch.tensor(t3 - t2)})
        return metrics

    def _replay_bootstrap(self, first_returns: torch.Tensor, shape) -> torch.Tensor | None:
        """The replay-value loss's bootstrap values: the imagined lambda-return from each replayed
        state (``first_returns [N]``, shaped to the replayed ``[B, T]``) when every replayed state
        was imagined from, once and in order (the 2024 reference), else ``None``: the critic itself
        (TD(lambda) on replay; also with imagination groups, whose starts are a shuffled subset).
        One place for both paths (the separate losses and the fused graph)."""
        every_state = self.imagination.start_fraction >= 1.0 and getattr(self.imagination, "group_size", 1) == 1
        return first_returns.reshape(shape) if every_state else None

    def _replay_value_loss(self, states: TensorDictBase, traj: TensorDictBase) -> torch.Tensor:
        boot = self._replay_bootstrap(traj["lambda_return"][:, 0], states.batch_size)
        return self.critic_loss.replay_loss(states, boot)

    @staticmethod
    def _check(values: dict[str, torch.Tensor], iteration, run_dir, what: str = "loss") -> None:
        """One host sync for all values; names the first non-finite one. Runs before any
        ``optimizer.step()``, so parameters and optimizer moments stay untouched."""
        stacked = torch.stack([v.detach().reshape(()) for v in values.values()])
        if not bool(torch.isfinite(stacked).all()):
            bad = [k for k, v in values.items() if not bool(torch.isfinite(v))]
            raise NonFiniteError(bad[0], iteration=iteration, run_dir=run_dir,
                                 detail=f" ({what}; also non-finite: {bad[1:] or 'none'}; optimizer step not taken)")
