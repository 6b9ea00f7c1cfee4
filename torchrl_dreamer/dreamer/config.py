"""Config pieces every Dreamer recipe shares (the Gymnasium/custom-env recipe and the routing recipe):
the world-model loss weights, the optimiser and the choice types of the Dreamer recipes' fields, and
the env section both single-agent recipes (Dreamer and PPO) read.
Each field documents itself (``--help``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from ..config import Choice, doc
from ..trainer import LrSchedule

__all__ = ["SingleAgentEnvConfig", "WorldModelLossConfig", "OptimConfig", "FreeBitsGrad", "ModelSize", "CompileMode", "ActorGrad", "ContMode",
           "TwoHotSpace"]


class FreeBitsGrad(Choice):
    """Gradient of the KL terms below the free-bits threshold."""
    clip = "clip"
    straight_through = "straight_through"


class ModelSize(Choice):
    """Network size presets (the keys of ``torchrl_dreamer.dreamer.agent.PRESETS``)."""
    nano = "nano"
    tiny = "tiny"
    xs = "xs"
    s = "s"
    m = "m"
    l = "l"  # noqa: E741 - the paper's name


class TwoHotSpace(Choice):
    """Spacing and decoding of the two-hot bins of the reward head and the critic."""
    symlog = "symlog"
    symexp = "symexp"


class CompileMode(Choice):
    """What ``model.compile=true`` compiles."""
    step = "step"
    full = "full"


class ActorGrad(Choice):
    """Actor gradient estimator."""
    reinforce = "reinforce"
    dynamics = "dynamics"


class ContMode(Choice):
    """Continue flag used in imagination."""
    prob = "prob"
    mode = "mode"


@dataclass
class WorldModelLossConfig:
    dyn_scale: float = doc(0.5, "KL(sg(post) || prior) weight (paper 0.5).")
    rep_scale: float = doc(0.1, "KL(post || sg(prior)) weight (paper 0.1).")
    free_bits: float = doc(1.0, "Free nats on the KL summed over latents, per (batch, time).")
    free_bits_grad: FreeBitsGrad = doc(FreeBitsGrad.clip, "clip (paper: no gradient below free_bits) or "
                                                          "straight_through.")
    reconstruction_scale: float = doc(1.0, "Reconstruction loss weight.")
    reward_scale: float = doc(1.0, "Reward loss weight.")
    continue_scale: float = doc(1.0, "Continue loss weight.")
    terminal_weight: float = doc(1.0, "Weight of (rare) terminal rows in the continue loss (1 = paper).")
    terminal_reward_weight: float = doc(1.0, "Weight of (rare) terminal rows in the reward loss (1 = paper).")


@dataclass
class OptimConfig:
    world_model_lr: float = doc(4e-5, "World-model learning rate (LaProp).")
    actor_lr: float = doc(4e-5, "Actor learning rate.")
    critic_lr: float = doc(4e-5, "Critic learning rate.")
    agc: float = doc(0.3, "Adaptive gradient clipping: max gradient norm as a fraction of each parameter's norm.")
    eps: float = doc(1e-20, "LaProp epsilon.")
    warmup_steps: int = doc(1000, "Linear learning-rate warm-up (updates).")
    lr_schedule: LrSchedule = doc(LrSchedule.constant, "constant, or cosine: every learning rate (world model, actor, "
                                                       "critic) decays to lr * lr_final_fraction by the end of the run "
                                                       "(progress = the larger of the run's length done, in env steps "
                                                       "or iterations, and time used / run.time_budget_s).")
    lr_decay_start: float = doc(0.0, "Cosine schedule: progress (0-1) at which the decay starts; the rates are held "
                                     "before it (0: decay over the whole run).")
    lr_final_fraction: float = doc(0.1, "Cosine schedule: final learning rates as a fraction of the configured ones.")


@dataclass
class SingleAgentEnvConfig:
    """The env section of the single-agent recipes (Dreamer and PPO): a Gymnasium id or a factory."""

    name: str = doc("CartPole-v1", "Gymnasium env id (ignored when env.factory is set).")
    factory: str = doc("", "Custom env 'package.module:function' returning a TorchRL EnvBase (docs/custom_envs.md).")
    kwargs: Dict[str, Any] = doc({}, "Keyword arguments for gymnasium.make or the factory.")
    pixels: bool = doc(False, "Observe rendered frames, resized to 3x64x64 uint8 in the env transform.")
    obs_keys: List[str] = doc([], "Observation keys the world model encodes ([] = ['pixels'] or ['observation']).")
    num_envs: int = doc(4, "Envs stepped together (TorchRL SerialEnv).")
    still_tol: float = doc(0.0, "> 0: append to the vector observation the number of consecutive steps over which no "
                                "entry changed by this much (torchrl_dreamer.transforms.StillSteps; for envs that end "
                                "an episode after a hidden period at rest, like LunarLander's landing). 0 = off.")
    time_feature: bool = doc(False, "Append log(1 + steps left before the episode's step limit) to the vector observation "
                                    "and end episodes at the limit as terminations, not truncations "
                                    "(torchrl_dreamer.transforms.TimeFeature; the limit is env.max_episode_steps or "
                                    "the Gymnasium id's own).")
    max_episode_steps: int = doc(0, "Episode step limit (0 = the env's own).")
    action_repeat: int = doc(1, "Gymnasium ids: each action is applied for this many env frames (rewards summed, "
                                "stopping at the episode's end; TorchRL GymEnv(frame_skip=...)). Steps counted by "
                                "the recipe (train.env_steps, eval.every, replay rows) are then agent steps of this "
                                "many frames; env.max_episode_steps stays in frames. 1 = off.")
    mask_key: str = doc("action_mask", "Observation holding the env's bool action mask (True = allowed), used when the "
                                       "env has it (discrete actions): acting, prefill and evaluation pick allowed "
                                       "actions only, imagination predicts the mask ('' = ignore any mask).")
    mask_rule: str = doc("", "Optional 'package.module:function' mapping decoded observations {key: [N, F]} to the "
                             "bool mask [N, A] in imagination (else the world model's learned mask head).")
    reward_scale: float = doc(1.0, "Multiply rewards by this before the replay (DreamerV3 divides returns by "
                                   "max(1, range): returns spanning < 1 are not scaled up, so tiny rewards learn "
                                   "slowly; logged episode sums stay in env units).")
