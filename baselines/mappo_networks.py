"""Plain ``nn.Module`` networks (tensors in, tensors out). TensorDict wiring lives in factories.

:class:`AgentGroupMLP` has the semantics of TorchRL's ``MultiAgentMLP`` (shared or per-agent
parameters, centralised or decentralised inputs) but runs per-agent parameters as one batched
matmul (``baddbmm``) instead of ``vmap`` + ``TensorDict.to_module`` on every call, which is what
makes it cheap inside PPO minibatch loops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "PlainMLP", "AgentGroupMLP", "TanhNormalHead"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU}


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation '{name}'; choose one of {sorted(ACTIVATIONS)}") from None


class PlainMLP(nn.Sequential):
    """``depth`` hidden layers of ``width`` units with ``activation``, then a linear output."""

    def __init__(self, in_features: int, out_features: int, *, width: int, depth: int, activation: str) -> None:
        act = _activation(activation)
        layers: list[nn.Module] = []
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), act()]
            size = width
        layers.append(nn.Linear(size, out_features))
        super().__init__(*layers)


class _BatchedLinear(nn.Module):
    """``n`` independent linear layers applied as one ``baddbmm``: ``[n, N, in] -> [n, N, out]``."""

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        # Same distribution as nn.Linear's default init, independently per agent.
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class AgentGroupMLP(nn.Module):
    """An MLP per agent (or one shared by all agents).

    Args:
        in_features: per-agent input size.
        out_features: per-agent output size.
        n_agents: number of agents ``A``.
        centralised: if True each agent's network sees the inputs of all agents (a centralised
            critic, MAPPO); if False only its own (IPPO critic, decentralised actors).
        share_params: one set of parameters for all agents. With ``centralised`` and shared
            parameters every agent gets the same output (computed once, then expanded), exactly
            as TorchRL's ``MultiAgentMLP``.
        width, depth, activation: hidden layers.

    Shapes: ``x`` is ``[*B, A, in_features]``; the output is ``[*B, A, out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_agents: int,
        *,
        centralised: bool,
        share_params: bool,
        width: int = 256,
        depth: int = 2,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.n_agents = n_agents
        self.centralised = centralised
        self.share_params = share_params
        net_in = in_features * n_agents if centralised else in_features
        if share_params:
            self.net = PlainMLP(net_in, out_features, width=width, depth=depth, activation=activation)
        else:
            act = _activation(activation)
            layers: list[nn.Module] = []
            size = net_in
            for _ in range(depth):
                layers += [_BatchedLinear(n_agents, size, width), act()]
                size = width
            layers.append(_BatchedLinear(n_agents, size, out_features))
            self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.n_agents, self.in_features):
            raise ValueError(
                f"expected input [..., {self.n_agents}, {self.in_features}], got {tuple(x.shape)}"
            )
        batch_shape = x.shape[:-2]
        if self.share_params:
            if self.centralised:
                out = self.net(x.reshape(*batch_shape, self.n_agents * self.in_features))
                return out.unsqueeze(-2).expand(*batch_shape, self.n_agents, self.out_features)
            return self.net(x)
        flat = x.reshape(-1, self.n_agents, self.in_features)  # [N, A, in]
        if self.centralised:
            inputs = flat.reshape(1, -1, self.n_agents * self.in_features).expand(self.n_agents, -1, -1)
        else:
            inputs = flat.transpose(0, 1)  # [A, N, in]
        out = self.net(inputs)  # [A, N, out]
        return out.transpose(0, 1).reshape(*batch_shape, self.n_agents, self.out_features)


class TanhNormalHead(nn.Module):
    """Maps network outputs to a tanh-squashed Gaussian over a box ``[low, high]``.

    The network emits ``2 * action_dim`` numbers per agent: ``loc`` and a pre-scale. The scale is
    ``softplus(pre + bias)`` with the bias that makes it ``init_scale`` at ``pre = 0`` (1.0 is
    TorchRL's ``biased_softplus_1.0``), clamped at ``min_scale``. Actions are ``low + (high - low) * (tanh(u) + 1) / 2`` with ``u ~ N(loc, scale)``.

    Log-probabilities are kept in two parts: the Gaussian log-density of the pre-squash sample
    ``u`` (used by PPO: the squash Jacobian depends only on ``u``, so it cancels in the ratio and
    never needs ``atanh`` of a saturated action) and the Jacobian term (added for the full
    log-prob of the action, used for entropy estimates and logging).
    """

    def __init__(self, low: torch.Tensor, high: torch.Tensor, min_scale: float = 1e-4, init_scale: float = 1.0) -> None:
        super().__init__()
        low = torch.as_tensor(low, dtype=torch.float32)
        high = torch.as_tensor(high, dtype=torch.float32)
        if not bool((high > low).all()):
            raise ValueError("TanhNormalHead needs high > low for every action dimension")
        self.register_buffer("low", low)
        self.register_buffer("half_range", (high - low) / 2)
        self.register_buffer("log_half_range_sum", torch.log((high - low) / 2).sum())
        self.min_scale = min_scale
        if not init_scale > min_scale:
            raise ValueError(f"init_scale must be > min_scale={min_scale}, got {init_scale}")
        self.scale_bias = math.log(math.expm1(init_scale))  # softplus(bias) = init_scale

    def params(self, net_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, pre_scale = net_out.chunk(2, dim=-1)
        scale = F.softplus(pre_scale + self.scale_bias).clamp_min(self.min_scale)
        return loc, scale

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.low + self.half_range * (torch.tanh(u) + 1.0)

    @staticmethod
    def gaussian_log_prob(u: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Log-density of ``u`` under ``N(loc, scale)``, summed over the action dimension."""
        z = (u - loc) / scale
        return (-0.5 * z.pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def log_abs_det_jacobian(self, u: torch.Tensor) -> torch.Tensor:
        """``log |d action / d u|`` summed over action dims (stable form of log(1 - tanh(u)^2))."""
        log_dtanh = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return log_dtanh.sum(-1) + self.log_half_range_sum

    def log_prob(self, u: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Full log-density of the squashed action ``squash(u)``."""
        return self.gaussian_log_prob(u, loc, scale) - self.log_abs_det_jacobian(u)
