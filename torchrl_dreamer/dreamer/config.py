"""Config pieces every Dreamer recipe shares (the Gymnasium/custom-env recipe and the routing recipe):
the world-model loss weights and the optimiser. Each field documents itself (``--help``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import doc

__all__ = ["WorldModelLossConfig", "OptimConfig"]


@dataclass
class WorldModelLossConfig:
    dyn_scale: float = doc(0.5, "KL(sg(post) || prior) weight (paper 0.5).")
    rep_scale: float = doc(0.1, "KL(post || sg(prior)) weight (paper 0.1).")
    free_bits: float = doc(1.0, "Free nats on the KL summed over latents, per (batch, time).")
    free_bits_grad: str = doc("clip", "clip (paper: no gradient below free_bits) or straight_through.")
    reconstruction_scale: float = doc(1.0, "Reconstruction loss weight.")
    reward_scale: float = doc(1.0, "Reward loss weight.")
    continue_scale: float = doc(1.0, "Continue loss weight.")
    terminal_weight: float = doc(1.0, "Weight of (rare) terminal rows in the continue loss (1 = paper).")


@dataclass
class OptimConfig:
    world_model_lr: float = doc(4e-5, "World-model learning rate (LaProp).")
    actor_lr: float = doc(4e-5, "Actor learning rate.")
    critic_lr: float = doc(4e-5, "Critic learning rate.")
    agc: float = doc(0.3, "Adaptive gradient clipping: max gradient norm as a fraction of each parameter's norm.")
    eps: float = doc(1e-20, "LaProp epsilon.")
    warmup_steps: int = doc(1000, "Linear learning-rate warm-up (updates).")
