"""One DreamerV3 gradient update, as a named object so it can be profiled, timed and compiled.

``DreamerUpdate(batch)`` runs: world-model loss on a replayed ``[B, T]`` slice -> imagination from
its (detached) posterior states -> critic loss -> actor loss -> non-finite guard -> optimizer step
-> slow-critic EMA. The world-model graph and the actor/critic graph are disjoint (imagination
starts from detached states), so they are back-propagated separately; that costs nothing extra
and gives the time breakdown the throughput benchmark reports.

Optimisation reuses TorchRL's ``DreamerV3Optimizer`` (LaProp: RMS-normalised gradient with
momentum, plus adaptive gradient clipping at 0.3 of each parameter tensor's norm), checked
against the DreamerV3 reference (``tests/test_dreamer_update.py``), with one parameter group per
module so each gets its own learning rate.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
from tensordict import TensorDictBase
from torchrl.trainers.algorithms.dreamer_v3 import DreamerV3Optimizer

from ..guards import NonFiniteError
from .agent import DreamerAgent
from .imagination import ImaginationModule
from .losses import ActorLoss, CriticLoss, WorldModelLoss

__all__ = ["make_optimizer", "DreamerUpdate"]


def make_optimizer(agent: DreamerAgent, *, world_model_lr: float = 4e-5, actor_lr: float = 4e-5,
                   critic_lr: float = 4e-5, agc: float = 0.3, eps: float = 1e-20, warmup_steps: int = 1000,
                   beta1: float = 0.9, beta2: float = 0.999) -> DreamerV3Optimizer:
    """TorchRL's ``DreamerV3Optimizer`` with param groups ``world_model``, ``actor``, ``critic``."""
    groups = [
        {"params": list(agent.world_model.parameters()), "lr": world_model_lr, "name": "world_model"},
        {"params": list(agent.actor.parameters()), "lr": actor_lr, "name": "actor"},
        {"params": list(agent.critic.parameters()), "lr": critic_lr, "name": "critic"},
    ]
    return DreamerV3Optimizer(groups, lr=world_model_lr, agc=agc, eps=eps, warmup_steps=warmup_steps,
                              beta1=beta1, beta2=beta2)


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

    def __init__(self, agent: DreamerAgent, world_model_loss: WorldModelLoss, critic_loss: CriticLoss,
                 actor_loss: ActorLoss, imagination: ImaginationModule, optimizer: torch.optim.Optimizer,
                 *, timing: bool = True) -> None:
        self.agent = agent
        self.world_model_loss, self.critic_loss, self.actor_loss = world_model_loss, critic_loss, actor_loss
        self.imagination, self.optimizer, self.timing = imagination, optimizer, timing
        self.groups = {g.get("name", str(i)): g["params"] for i, g in enumerate(optimizer.param_groups)}
        self.dynamics_grad = actor_loss.actor_grad == "dynamics"

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
        critic_td, targets = self.critic_loss(traj)
        actor_td = self.actor_loss(traj.update(targets))  # traj is our own fresh TensorDict
        ac_losses = {"loss/critic": critic_td["loss_critic"], "loss/actor": actor_td["loss_actor"]}
        if self.critic_loss.replay_scale > 0:
            ac_losses["loss/replay_value"] = self._replay_value_loss(states, traj)
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
        if self.timing:
            metrics.update({"time/update_world_model_s": torch.tensor(t1 - t0),
                            "time/update_imagination_s": torch.tensor(t2 - t1),
                            "time/update_actor_critic_s": torch.tensor(t3 - t2)})
        return metrics

    def _replay_value_loss(self, states: TensorDictBase, traj: TensorDictBase) -> torch.Tensor:
        """Bootstraps from the imagined returns when every replayed state was imagined from
        (the 2024 reference), else from the critic itself (TD(lambda) on replay)."""
        B, T = states.batch_size
        if self.imagination.start_fraction < 1.0:
            return self.critic_loss.replay_loss(states)
        return self.critic_loss.replay_loss(states, traj["lambda_return"][:, 0].reshape(B, T))

    @staticmethod
    def _check(values: dict[str, torch.Tensor], iteration, run_dir, what: str = "loss") -> None:
        """One host sync for all values; names the first non-finite one. Runs before any
        ``optimizer.step()``, so parameters and optimizer moments stay untouched."""
        stacked = torch.stack([v.detach().reshape(()) for v in values.values()])
        if not bool(torch.isfinite(stacked).all()):
            bad = [k for k, v in values.items() if not bool(torch.isfinite(v))]
            raise NonFiniteError(bad[0], iteration=iteration, run_dir=run_dir,
                                 detail=f" ({what}; also non-finite: {bad[1:] or 'none'}; optimizer step not taken)")
