"""DreamerV3 on Gymnasium envs (CartPole, LunarLander, Pendulum; vector or pixel observations) or
any TorchRL env from a factory.

    python -m recipes.dreamer --env cartpole                        # vector CartPole-v1
    python -m recipes.dreamer --env cartpole_pixels                 # 64x64 pixels
    python -m recipes.dreamer --env lunarlander model.size=xs
    python -m recipes.dreamer --resume runs/dreamer/CartPole-v1/<stamp> train.env_steps=100000
    python -m recipes.dreamer --evaluate runs/dreamer/CartPole-v1/<stamp> eval.episodes=20

Layers: ``configs/dreamer/base.yaml`` <- ``configs/dreamer/<env>.yaml`` <- CLI overrides.
Loop: collect ``env.num_envs x train.steps_per_collect`` env steps with TorchRL's ``Collector``
(random actions until ``replay.prefill`` steps) -> rows into the replay -> as many updates as
``replay.train_ratio`` asks (replayed steps per env step) -> log / evaluate / checkpoint.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torchrl.envs import EnvBase, TensorDictPrimer

from torchrl_dreamer.checkpoint import (
    CHECKPOINT_NAME, CheckpointError, averaged_weights, load_checkpoint, load_weights, rng_state, set_rng_state,
    weight_average,
)
from torchrl_dreamer.collectors import (CollectorConfig, WeightPusher, WorkerFailedError, WorkerWatchdog, acting_copy,
                                        check_collector_config, describe, finite_frames, keep_threads,
                                        make_collector, shutdown_quietly, worker_chunks)
from torchrl_dreamer.config import ConfigError, check_ranges, doc
from torchrl_dreamer.cpu import compile_unavailable, inductor_options, tune_malloc
from torchrl_dreamer.dreamer.config import (ActorGrad, CompileMode, ContMode, ModelSize, OptimConfig, TwoHotSpace,
                                           SingleAgentEnvConfig, WorldModelLossConfig)
from torchrl_dreamer.dreamer.agent import DreamerAgent, DreamerPolicy, make_agent, preset
from torchrl_dreamer.dreamer.envs import make_dreamer_env
from torchrl_dreamer.dreamer.imagination import ActionMaskHooks, ImaginationModule
from torchrl_dreamer.dreamer.losses import DreamerPolicyLoss, DreamerCriticLoss, DreamerWorldModelLoss
from torchrl_dreamer.dreamer.replay import (SequenceWriter, load_replay_state_dict, make_replay_buffer,
                                           replay_state_dict)
from torchrl_dreamer.dreamer.update import DreamerUpdate, make_optimizer, set_learning_rates, terminal_calibration
from torchrl_dreamer.guards import check_tensordict_finite
from torchrl_dreamer.evaluation import (EvalActions, confirm_final_and_best, evaluation_paths, recheck,
                                        report_evaluation, run_episodes)
from torchrl_dreamer.runtime import check_device
from torchrl_dreamer.trainer import EvalConfig, Recipe, RunConfig, TrainingRun, entry_points, run_progress

CONFIG_DIR = Path(__file__).parent / "configs" / "dreamer"
RECIPE = "dreamer"
BEST_NAME = "best.pt"  # eval.keep_best: the weights behind the best evaluation of a run


# --- config -----------------------------------------------------------------------------------


EnvConfig = SingleAgentEnvConfig  # the env section, shared with recipes/ppo.py


@dataclass
class ModelConfig:
    size: ModelSize = doc(ModelSize.tiny, "Size preset: nano and tiny are CPU sizes, xs and up the DreamerV3 paper's "
                                          "widths.")
    deter: int = doc(0, "Override: GRU state size (0 = preset).")
    hidden: int = doc(0, "Override: GRU input/hidden size (0 = preset).")
    units: int = doc(0, "Override: MLP width of encoder/decoder/heads/actor/critic (0 = preset).")
    layers: int = doc(0, "Override: MLP layers (0 = preset).")
    stoch: int = doc(0, "Override: number of categorical latents G (0 = preset).")
    classes: int = doc(0, "Override: classes per latent C (0 = preset).")
    blocks: int = doc(0, "Override: GRU blocks (0 = preset).")
    cnn_depth: int = doc(0, "Override: channels of the first conv layer (0 = preset).")
    twohot: TwoHotSpace = doc(TwoHotSpace.symlog, "Two-hot bins of the reward head and the critic: symlog (even in "
                                                  "symlog space, prediction = symexp of the mean bin: the 2023 paper's "
                                                  "text) or symexp (the reference code's symexp_twohot: the same bins "
                                                  "in raw units, prediction = the distribution's mean, so rare large "
                                                  "rewards are not shrunk towards 0).")
    unimix: float = doc(0.01, "Uniform mix of latent and (discrete) policy distributions.")
    compile: bool = doc(False, "torch.compile parts of the update (optional; see compile_mode; measure first).")
    compile_mode: CompileMode = doc(CompileMode.step, "With compile=true: step (the RSSM scan step and the imagination step) or full "
                                     "(the whole posterior scan, the whole imagination rollout with its noise drawn "
                                     "up front, the world-model/critic/actor losses and the optimizer step): ~2x the eager "
                                     "update rate (CartPole YAML: 12-14.7 vs 6.4 updates/s), but compile time grows with "
                                     "replay.seq_len and ac.horizon: at the CartPole YAML's 32 x 32 batches ~3.5 "
                                     "minutes on a cold inductor cache, ~1 min with a warm one. Measure first.")
    compile_cpp_wrapper: bool = doc(True, "With compile=true on CPU: inductor's C++ host code for the compiled graphs "
                                          "(cpp_wrapper; ~4% more updates/s at the benchmark sizes, but a longer cold "
                                          "compile: +3.5 min at the CartPole YAML's sizes, whose YAML turns it off). "
                                          "false: its Python host code.")


@dataclass
class ActorCriticConfig:
    horizon: int = doc(15, "Imagination horizon H.")
    discount: float = doc(0.997, "Discount gamma (paper 0.997 = 1 - 1/333).")
    lmbda: float = doc(0.95, "Lambda of the lambda-returns.")
    entropy_coef: float = doc(3e-4, "Actor entropy bonus (paper 3e-4).")
    actor_grad: ActorGrad = doc(ActorGrad.reinforce, "reinforce (any action space) or dynamics (continuous: backprop through the model).")
    start_fraction: float = doc(1.0, "Imagine from this fraction of the replayed states (1 = all, as the paper; CPU knob).")
    cont_mode: ContMode = doc(ContMode.prob, "Imagined continue flag: prob (continue-head probability, 2024 reference) "
                                             "or mode (0/1, the 2023 paper).")
    slow_critic_fraction: float = doc(0.02, "EMA fraction of the slow critic per update.")
    slow_reg_scale: float = doc(1.0, "Weight of the critic's regulariser towards the slow critic.")
    replay_value_scale: float = doc(0.0, "Weight of the replay-value critic loss (0 = off, for its CPU cost; 2024 "
                                         "reference: 0.3).")
    return_decay: float = doc(0.99, "EMA decay of the return percentile range.")
    group_size: int = doc(1, "Trajectories imagined per start (the same number in all; reinforce only). > 1: every "
                             "step's advantage is its trajectory's return minus the mean of the other K - 1 from "
                             "the same start, instead of the critic's R_t - V(s_t) (1 = paper).")


@dataclass
class DreamerOptimConfig(OptimConfig):
    ema_decay: float = doc(0.0, "Keep an exponential moving average of the agent's weights (torch.optim.swa_utils."
                                "AveragedModel), moved after every update (0.999 averages over ~1,000 updates). "
                                "Evaluations, best.pt, the end-of-run score and --evaluate then play the average; "
                                "each periodic evaluation plays the last iterate first (eval/episode_reward_sum_last), "
                                "and collection always acts with the last iterate. 0 = off.")


@dataclass
class ReplayConfig:
    capacity: int = doc(1_000_000, "Replay capacity in rows (env steps + one per finished episode).")
    batch_size: int = doc(16, "Sequences per update.")
    seq_len: int = doc(64, "Steps per sequence (may cross episode boundaries, marked by is_first).")
    train_ratio: float = doc(512.0, "Replayed steps per env step (updates = env steps * ratio / (batch * seq_len)).")
    prefill: int = doc(2500, "Env steps with uniformly random actions before the first update.")
    terminal_fraction: float = doc(0.0, "Share of each batch's windows drawn around a stored terminal row (0-1; "
                                        "0 = all uniform): rare episode ends reach the reward and continue heads "
                                        "more often, which then lean towards ending.")


@dataclass
class TrainConfig:
    env_steps: int = doc(50_000, "Total env steps (all envs together).")
    steps_per_collect: int = doc(16, "Steps per env per collector batch (updates are interleaved between batches).")


@dataclass
class DreamerEvalConfig(EvalConfig):
    every: int = doc(5000, "Evaluate every N env steps (0 = only at the end).")
    episodes: int = doc(10, "Evaluation episodes (run in parallel).")
    actions: EvalActions = doc(EvalActions.mode, "Actions in every evaluation (periodic, end-of-run, --evaluate): "
                                                 "mode = the actor's most likely action; sample = drawn from the "
                                                 "actor as in training (DreamerV3's reference code).")
    stop_at_return: Optional[float] = doc(None, "Stop training once the eval mean reaches this (null = never).")
    keep_best: bool = doc(True, "After each evaluation that beats every earlier one, write the weights to "
                                "<run>/best.pt (score it with --evaluate <run>/best.pt).")
    recheck_episodes: int = doc(0, "With keep_best: an evaluation that beats the best so far plays this many more "
                                   "episodes with the same weights (rounds of eval.episodes), and best.pt is replaced "
                                   "only if the mean over all of them (eval/recheck_episode_reward_sum) beats the best's "
                                   "pooled score, which eval/best_episode_reward_sum then reports. The best of many "
                                   "short evaluations flatters its policy; this picks best.pt on more episodes "
                                   "(0 = off: best.pt follows the eval.episodes score).")
    confirm_episodes: int = doc(50, "At the end of a run, score the final weights and best.pt on this many fresh "
                                    "episodes each and write <run>/result.json naming the better one (0 = skip).")


@dataclass
class DreamerRunConfig(RunConfig):
    checkpoint_every: int = doc(10_000, "Write the checkpoint every N env steps (and at the end).")
    time_budget_s: float = doc(0.0, "Stop after this many seconds of training (0 = no limit; counts across --resume).")
    log_every: int = doc(1000, "Log scalars every N env steps.")
    save_replay: bool = doc(True, "Keep the replay rows in the checkpoint (exact resume; larger file).")


@dataclass
class DreamerConfig:
    """Every default of the recipe (the DreamerV3 paper's values unless a field's help says otherwise);
    ``configs/dreamer/<env>.yaml`` sets only what differs for that env."""
    seed: int = doc(0, "Seed for torch, numpy, python and the envs.")
    device: str = doc("cpu", "Device of the networks and updates (cpu, cuda, ...); envs and replay stay on CPU.")
    threads: int = doc(0, "torch intra-op threads (0 = torch's default).")
    tune_malloc: bool = doc(True, "Keep freed memory in the process (glibc mallopt; faster large tensors, see torchrl_dreamer/cpu.py).")
    env: EnvConfig = doc(EnvConfig(), "Environment.")
    model: ModelConfig = doc(ModelConfig(), "Network sizes.")
    loss: WorldModelLossConfig = doc(WorldModelLossConfig(), "World-model loss.")
    ac: ActorCriticConfig = doc(ActorCriticConfig(), "Imagination, actor and critic.")
    optim: DreamerOptimConfig = doc(DreamerOptimConfig(), "Optimiser (LaProp + AGC, TorchRL's DreamerV3Optimizer).")
    replay: ReplayConfig = doc(ReplayConfig(), "Replay buffer and train ratio.")
    train: TrainConfig = doc(TrainConfig(), "Training length and collection.")
    collector: CollectorConfig = doc(CollectorConfig(), "Where the envs run: in the learner process, worker "
                                                        "processes or Ray actors (docs/scaling.md).")
    eval: DreamerEvalConfig = doc(DreamerEvalConfig(), "Evaluation.")
    run: DreamerRunConfig = doc(DreamerRunConfig(), "Run directory, logging and checkpoints.")


def validate(cfg: DreamerConfig) -> None:
    """Checks values the type system cannot, before any run directory or env is created (choice
    fields are enums: load_config already rejected values outside them)."""
    check_ranges(cfg, {
        "env.num_envs": ">= 1", "env.max_episode_steps": ">= 0", "env.still_tol": ">= 0", "threads": ">= 0",
        "env.action_repeat": ">= 1",
        "model.deter": ">= 0", "model.hidden": ">= 0", "model.units": ">= 0", "model.layers": ">= 0",
        "model.stoch": ">= 0", "model.classes": ">= 0", "model.blocks": ">= 0", "model.cnn_depth": ">= 0",
        "model.unimix": "[0, 1)",
        "loss.dyn_scale": ">= 0", "loss.rep_scale": ">= 0", "loss.free_bits": ">= 0",
        "loss.reconstruction_scale": ">= 0", "loss.reward_scale": ">= 0", "loss.continue_scale": ">= 0",
        "loss.terminal_weight": "> 0", "loss.terminal_reward_weight": "> 0",
        "ac.horizon": ">= 1", "ac.discount": "(0, 1]", "ac.lmbda": "[0, 1]", "ac.entropy_coef": ">= 0",
        "ac.start_fraction": "(0, 1]", "ac.slow_critic_fraction": "(0, 1]", "ac.slow_reg_scale": ">= 0",
        "ac.replay_value_scale": ">= 0", "ac.return_decay": "[0, 1)", "ac.group_size": ">= 1",
        "optim.world_model_lr": "> 0", "optim.actor_lr": "> 0", "optim.critic_lr": "> 0", "optim.agc": "> 0",
        "optim.eps": "> 0", "optim.warmup_steps": ">= 0", "optim.lr_decay_start": "[0, 1)",
        "optim.lr_final_fraction": "(0, 1]", "optim.ema_decay": "[0, 1)",
        "replay.capacity": ">= 1", "replay.batch_size": ">= 1", "replay.seq_len": ">= 2",
        "replay.train_ratio": "> 0", "replay.prefill": ">= 0", "replay.terminal_fraction": "[0, 1]",
        "train.env_steps": ">= 1", "train.steps_per_collect": ">= 1",
        "eval.every": ">= 0", "eval.episodes": ">= 1", "eval.confirm_episodes": ">= 0", "eval.recheck_episodes": ">= 0",
        "run.log_every": ">= 1", "run.checkpoint_every": ">= 1", "run.time_budget_s": ">= 0",
    })
    if cfg.ac.group_size > 1 and cfg.ac.actor_grad != ActorGrad.reinforce:
        raise ConfigError("ac.group_size > 1 (group baseline) needs ac.actor_grad=reinforce")
    if cfg.replay.capacity < cfg.replay.batch_size * cfg.replay.seq_len:
        raise ConfigError("replay.capacity is smaller than one batch (batch_size * seq_len)")
    check_collector_config(cfg.collector)
    streams = total_envs(cfg)
    if cfg.replay.prefill < streams * cfg.replay.seq_len:
        what = "env.num_envs" if streams == cfg.env.num_envs else "env.num_envs * collector.num_workers"
        raise ConfigError(f"replay.prefill ({cfg.replay.prefill}) must be at least {what} * replay.seq_len "
                          f"({streams} x {cfg.replay.seq_len} = {streams * cfg.replay.seq_len}) env "
                          "steps, so that every env's stream holds one whole sequence before the first update")
    if cfg.eval.stop_at_return is not None and not math.isfinite(cfg.eval.stop_at_return):
        raise ConfigError(f"eval.stop_at_return must be finite or null, got {cfg.eval.stop_at_return}")
    if cfg.env.pixels and cfg.env.obs_keys and cfg.env.obs_keys != ["pixels"]:
        raise ConfigError("env.pixels=true observes 'pixels' only; leave env.obs_keys empty")
    if cfg.env.reward_scale <= 0 or not math.isfinite(cfg.env.reward_scale):
        raise ConfigError(f"env.reward_scale must be a finite number > 0, got {cfg.env.reward_scale}")
    if cfg.env.mask_rule:
        mask_rule(cfg)  # imports it: a misspelt rule fails here, before any run directory exists
    if not cfg.env.factory:
        from torchrl_dreamer.dreamer.envs import gym_env_ids

        if cfg.env.name not in gym_env_ids():
            raise ConfigError(f"unknown Gymnasium env id '{cfg.env.name}' (env.name)")
    check_device(cfg.device)


def preflight(cfg: DreamerConfig, resume_state: Optional[dict]) -> None:
    """Builds what can fail before anything is written: the env (factory import and call), the
    agent from its specs and, on resume, the checkpoint's weights loaded into it (shapes)."""
    env = make_env_from_config(cfg, num_envs=cfg.env.num_envs, seed=cfg.seed, check=True)
    try:
        agent, _ = build_agent(cfg, env)
        if resume_state is not None:
            load_weights(agent, resume_state["agent"], "checkpoint")
            if resume_state.get("ema") is not None:
                load_weights(agent, averaged_weights(resume_state), "checkpoint's weight average")
            replay = resume_state.get("replay") or {}
            rows = int(replay.get("_storage", {}).get("_len", 0)) if replay.get("_format") else 0
            if rows > cfg.replay.capacity:
                raise ConfigError(f"replay.capacity={cfg.replay.capacity} is smaller than the {rows} replay rows in "
                                  f"the checkpoint; resume with replay.capacity >= {rows}")
    finally:
        env.close(raise_if_closed=False)


# --- factories ---------------------------------------------------------------------------------


def model_sizes(cfg: ModelConfig):
    overrides = {k: getattr(cfg, k) for k in ("deter", "hidden", "units", "layers", "stoch", "classes", "blocks",
                                              "cnn_depth") if getattr(cfg, k)}
    return preset(cfg.size, twohot=TwoHotSpace(cfg.twohot).value, **overrides)


def make_env_from_config(cfg: DreamerConfig, *, num_envs: int, seed: int, check: bool = False) -> EnvBase:
    """The env of this config (``check``: run the env contract on a factory env first)."""
    return make_dreamer_env(env_id=cfg.env.name, factory=cfg.env.factory, num_envs=num_envs, pixels=cfg.env.pixels,
                            seed=seed, max_episode_steps=cfg.env.max_episode_steps, kwargs=cfg.env.kwargs,
                            mask_key=cfg.env.mask_key, check_as="dreamer" if check else "",
                            obs_keys=tuple(obs_keys(cfg)), still_tol=cfg.env.still_tol,
                            time_feature=cfg.env.time_feature, action_repeat=cfg.env.action_repeat)


def total_envs(cfg: DreamerConfig) -> int:
    """Envs over all collector workers (one replay stream each)."""
    return cfg.env.num_envs * (cfg.collector.num_workers if cfg.collector.backend != "direct" else 1)


def worker_env(cfg: DreamerConfig, primers: dict, seed: int, worker: int) -> EnvBase:
    """One collector worker's env (built in the worker): the config's env, seeded per worker, with
    the policy's state primer."""
    env = make_env_from_config(cfg, num_envs=cfg.env.num_envs, seed=seed + 1_000_003 * worker)
    env.append_transform(TensorDictPrimer(primers=primers, default_value=0.0, expand_specs=True))
    return env


def obs_keys(cfg: DreamerConfig) -> list[str]:
    return list(cfg.env.obs_keys) or (["pixels"] if cfg.env.pixels else ["observation"])


def mask_rule(cfg: DreamerConfig) -> Optional[Callable]:
    """``env.mask_rule`` imported (None when unset)."""
    if not cfg.env.mask_rule:
        return None
    from torchrl_dreamer.envs import EnvFactoryError, resolve_factory

    try:
        return resolve_factory(cfg.env.mask_rule)
    except EnvFactoryError as exc:
        raise ConfigError(str(exc).replace("env.factory", "env.mask_rule", 1)) from None


def action_space(env: EnvBase) -> tuple[int, bool, Any, Any]:
    """``(action_dim, discrete, low, high)`` from the env's action spec (one-hot or box; a
    ``Categorical`` spec was already made one-hot by the env transforms)."""
    from torchrl.data import Bounded, OneHot

    spec = env.action_spec_unbatched
    if isinstance(spec, OneHot):
        return spec.shape[-1], True, None, None
    if isinstance(spec, Bounded):
        return spec.shape[-1], False, spec.space.low, spec.space.high
    raise ConfigError("the Dreamer recipe needs a Categorical or OneHot (discrete) or Bounded (continuous) action "
                      f"spec; got {type(spec).__name__}")


def env_mask_key(cfg: DreamerConfig, env: EnvBase) -> Optional[str]:
    """``env.mask_key`` when the env observes it (else None: no mask)."""
    key = cfg.env.mask_key
    return key if key and key in env.observation_spec.keys() else None


def build_agent(cfg: DreamerConfig, env: EnvBase) -> tuple[DreamerAgent, DreamerPolicy]:
    keys = obs_keys(cfg)
    spec = env.observation_spec
    mask_key = env_mask_key(cfg, env)
    shapes = {}
    for key in [*keys, *([mask_key] if mask_key and mask_key not in keys else [])]:
        if key not in spec.keys():
            raise ConfigError(f"observation key '{key}' not in the env's observation spec: {list(spec.keys())}")
        shapes[key] = tuple(spec[key].shape[len(env.batch_size):])
    action_dim, discrete, low, high = action_space(env)
    if mask_key and not discrete:
        raise ConfigError(f"the env observes '{mask_key}' but its actions are continuous; set env.mask_key='' to "
                          "ignore it")
    agent = make_agent(shapes, action_dim, discrete, model_sizes(cfg.model), cfg.model.unimix,
                       mask_key=mask_key).to(cfg.device)
    policy = DreamerPolicy(agent.world_model, agent.actor, obs_keys={k: k for k in shapes},
                           action_low=low, action_high=high).to(cfg.device)
    return agent, policy


def policy_with(policy: DreamerPolicy, agent: DreamerAgent) -> DreamerPolicy:
    """``policy`` acting with ``agent``'s networks instead (e.g. the copy holding the weight average)."""
    bounds = {} if policy.discrete else {"action_low": policy.action_low, "action_high": policy.action_high}
    return DreamerPolicy(agent.world_model, agent.actor, obs_keys=dict(policy.obs_keys), mask_key=policy.mask_key,
                         **bounds).to(policy.prefill_flag.device)


def build_update(cfg: DreamerConfig, agent: DreamerAgent) -> DreamerUpdate:
    lc, ac = cfg.loss, cfg.ac
    wm_loss = DreamerWorldModelLoss(agent.world_model, dyn_scale=lc.dyn_scale, rep_scale=lc.rep_scale, free_bits=lc.free_bits,
                             free_bits_grad=lc.free_bits_grad, reconstruction_scale=lc.reconstruction_scale,
                             reward_scale=lc.reward_scale, continue_scale=lc.continue_scale,
                             terminal_weight=lc.terminal_weight, terminal_reward_weight=lc.terminal_reward_weight)
    critic_loss = DreamerCriticLoss(agent.critic, slow_fraction=ac.slow_critic_fraction, slow_reg_scale=ac.slow_reg_scale,
                             replay_scale=ac.replay_value_scale)
    masked = agent.world_model.mask_key is not None
    actor_loss = DreamerPolicyLoss(agent.actor, entropy_coef=ac.entropy_coef, actor_grad=ac.actor_grad,
                           critic=agent.critic if ac.actor_grad == "dynamics" else None, return_decay=ac.return_decay,
                           actor_input_keys=("action_mask",) if masked else (), group_size=ac.group_size)
    for loss in (critic_loss, actor_loss):
        loss.make_value_estimator(gamma=ac.discount, lmbda=ac.lmbda)
    hooks = ActionMaskHooks(agent.world_model, rule=mask_rule(cfg)) if masked else None
    imagination = ImaginationModule(agent.world_model, agent.actor, ac.horizon, start_fraction=ac.start_fraction,
                                    grad=ac.actor_grad == "dynamics", cont_mode=ac.cont_mode, hooks=hooks,
                                    group_size=ac.group_size)
    kw = inductor_options(cfg.device, cfg.model.compile_cpp_wrapper) if cfg.model.compile else {}
    if cfg.model.compile and cfg.model.compile_mode == "full":
        imagination.enable_compile(mode="loop", **kw)
        wm_loss.enable_compile(**kw)  # the whole world-model loss, its posterior scan included
        critic_loss.enable_compile(**kw)
        actor_loss.enable_compile(**kw)  # its compiled core is the REINFORCE one (actor_grad=dynamics stays eager)
    elif cfg.model.compile:
        agent.world_model.rssm.enable_compile(**kw)
        imagination.enable_compile(**kw)
    oc = cfg.optim
    optimizer = make_optimizer(agent, world_model_lr=oc.world_model_lr, actor_lr=oc.actor_lr, critic_lr=oc.critic_lr,
                               agc=oc.agc, eps=oc.eps, warmup_steps=oc.warmup_steps,
                               compile=cfg.model.compile and cfg.model.compile_mode == "full", compile_kwargs=kw)
    update = DreamerUpdate(agent, wm_loss, critic_loss, actor_loss, imagination, optimizer)
    if cfg.model.compile and cfg.model.compile_mode == "full":
        update.enable_compile(**kw)  # critic + actor + replay value as one graph (REINFORCE actors)
    return update


def with_policy_state(env: EnvBase, policy: DreamerPolicy) -> EnvBase:
    """Appends the primer that zeroes the policy's carried state at reset."""
    env.append_transform(TensorDictPrimer(primers=policy.primer_specs(), default_value=0.0, expand_specs=True))
    return env


def evaluate(policy: DreamerPolicy, env: EnvBase, *, max_steps: int = 100_000, actions: str = "mode",
             seed: Optional[int] = None) -> dict[str, float]:
    """One episode per env of ``env`` with mode or sampled actions (``eval.actions``), see
    :func:`torchrl_dreamer.evaluation.run_episodes`."""
    return run_episodes(policy, env, max_steps=max_steps, actions=actions, seed=seed)


# --- training ----------------------------------------------------------------------------------


class WeightAverage(NamedTuple):
    """``optim.ema_decay``'s weight average (torch's ``AveragedModel`` of the agent), the policy that acts
    with it and the eval env it plays in (its own, so the last iterate's evaluations are a plain run's)."""
    model: torch.optim.swa_utils.AveragedModel
    policy: DreamerPolicy
    env: EnvBase


@dataclass
class Progress:
    """The counters a Dreamer run carries across ``--resume`` (stored in its checkpoint)."""

    env_steps: int = 0
    updates: int = 0
    owed: float = 0.0  # updates owed by the train ratio, not yet run
    next_eval: int = 0
    next_ckpt: int = 0
    next_log: int = 0
    best_return: float = -math.inf  # best evaluation so far (eval.keep_best)


class LogWindow:
    """What happens between two log rows: summed update metrics (one host sync per row, not per
    update), finished episodes, and where the time went."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.episode_sums: list[float] = []
        self.episode_lengths: list[float] = []
        self.updates = self.steps = 0
        self.batches, self.lag_sum = 0, 0
        self.t_collect = self.t_update = 0.0
        self.t_start = time.perf_counter()

    def add_update(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v.detach().float() if k in self.sums else v.detach().float().clone()
        self.count += 1
        self.updates += 1

    def add_batch(self, batch, lag: int = 0) -> None:
        """A received batch; ``lag``: learner updates since the weights behind its actions were sent."""
        self.steps += batch.numel()
        self.batches += 1
        self.lag_sum += lag
        done = batch["next", "done"].reshape(-1)
        if bool(done.any()):
            self.episode_sums += batch["next", "episode_reward"].reshape(-1)[done].tolist()
            if ("next", "step_count") in batch.keys(True):
                self.episode_lengths += batch["next", "step_count"].reshape(-1)[done].float().tolist()

    def row(self, elapsed_s: float) -> dict[str, float]:
        """The window's metrics (means over its updates and episodes, rates, seconds)."""
        row = terminal_calibration({k: float(v) / self.count for k, v in self.sums.items()} if self.count else {})
        sums, lengths = self.episode_sums, self.episode_lengths
        row.update({
            "train/episode_reward_sum": sum(sums) / len(sums) if sums else math.nan,
            "train/episodes_finished": len(sums),
            "diag/policy_version_lag": self.lag_sum / self.batches if self.batches else 0.0,
            "time/updates_per_s": self.updates / max(self.t_update, 1e-9) if self.updates else 0.0,
            "time/env_steps_per_s": self.steps / max(time.perf_counter() - self.t_start, 1e-9),
            "time/collect_s": self.t_collect, "time/update_s": self.t_update, "time/total_s": elapsed_s,
        })
        if lengths:
            row["train/episode_length"] = sum(lengths) / len(lengths)
        return row


def best_score_on_disk(run_dir: Path) -> float:
    """The score stored in ``<run>/best.pt`` (it may be newer than the last checkpoint if the run died
    in between), or -inf when there is none; an unreadable ``best.pt`` is reported and ignored, so
    it never blocks a resume (the next better evaluation replaces it)."""
    path = run_dir / BEST_NAME
    if not path.is_file():
        return -math.inf
    try:
        score = float(load_checkpoint(path)["eval/episode_reward_sum"])
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        print(f"warning: ignoring {path}: {exc}", file=sys.stderr, flush=True)
        return -math.inf
    return score if math.isfinite(score) else -math.inf


def restore(cfg: DreamerConfig, resume_state: Optional[dict], run_dir: Path, agent: DreamerAgent,
            update: DreamerUpdate, rb, writer: SequenceWriter) -> Progress:
    """The counters of a new run, or a checkpoint loaded into the pieces (weights, optimizer, loss
    state, replay rows, writer, RNG states). The envs restart, so the writer moves to new stream ids."""
    if resume_state is None:
        return Progress(next_eval=cfg.eval.every, next_ckpt=cfg.run.checkpoint_every, next_log=cfg.run.log_every)
    load_weights(agent, resume_state["agent"], "checkpoint")
    update.optimizer.load_state_dict(resume_state["optimizer"])
    update.critic_loss.load_state_dict(resume_state["critic_loss"])
    update.actor_loss.load_state_dict(resume_state["actor_loss"])
    streams = writer.num_envs
    if resume_state.get("replay") is not None:
        load_replay_state_dict(rb, resume_state["replay"])  # also reads older full-capacity states
        writer.load_state_dict(resume_state["writer"])
    # the envs restart: new stream ids past every old one (also when the number of envs or workers
    # changed), so no replay window joins the old and the new episodes
    writer.stream_offset += max(streams, len(writer.next_step))
    if len(writer.next_step) != streams:
        writer.next_step = torch.zeros(streams, dtype=torch.long)
    writer.carry_reward = torch.zeros(streams)
    progress = Progress(**{k: resume_state[k] for k in ("env_steps", "updates", "owed", "next_eval", "next_ckpt",
                                                        "next_log")})
    # absent in checkpoints written before keep_best; best.pt may be newer than the checkpoint
    progress.best_return = max(resume_state.get("best_return", -math.inf), best_score_on_disk(run_dir))
    set_rng_state(resume_state["rng"])
    return progress


def announce_compile(cfg: DreamerConfig) -> None:
    """Says what ``model.compile=true`` costs, or falls back to eager (with a warning) where
    ``torch.compile`` cannot run."""
    if not cfg.model.compile:
        return
    reason = compile_unavailable(cfg.device)
    if reason is not None:
        print(f"warning: model.compile=true but torch.compile does not work here ({reason}); training "
              "eagerly (same algorithm, about half the update rate). A C++ compiler (g++/clang) and the "
              "Python headers enable it; model.compile=false silences this.", file=sys.stderr, flush=True)
        cfg.model.compile = False
    else:
        print(f"model.compile=true (compile_mode={cfg.model.compile_mode}): the first updates compile the "
              "update graphs (minutes on a cold inductor cache, e.g. ~3.5 min for the CartPole YAML on one "
              "core; ~1 min once cached); progress resumes after that.", file=sys.stderr, flush=True)


def train(cfg: DreamerConfig, run_dir: Path, resume_state: Optional[dict] = None,
          on_eval: Optional[Callable[[dict[str, float]], None]] = None) -> dict[str, float]:
    """Trains until ``train.env_steps`` (or the time budget, or ``eval.stop_at_return``); returns the
    last logged metrics. ``on_eval(metrics)`` is called after each evaluation (benchmarks)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_malloc:
        tune_malloc()
    torch.manual_seed(cfg.seed)
    cc, E = cfg.collector, cfg.env.num_envs
    learner_threads = torch.get_num_threads()
    env = make_env_from_config(cfg, num_envs=E, seed=cfg.seed)  # collects (direct); its specs build the agent
    agent, policy = build_agent(cfg, env)
    with_policy_state(env, policy)
    announce_compile(cfg)
    update = build_update(cfg, agent)
    rb = make_replay_buffer(cfg.replay.capacity, cfg.replay.batch_size, cfg.replay.seq_len,
                            terminal_fraction=cfg.replay.terminal_fraction)
    keys = list(policy.obs_keys)  # the observations and, for a masked env, its action mask
    writer = SequenceWriter({k: k for k in keys}, policy.from_env_action, total_envs(cfg),
                            reward_scale=cfg.env.reward_scale)
    p = restore(cfg, resume_state, run_dir, agent, update, rb, writer)
    # optim.ema_decay: the weight average, evaluated with an env of its own so that the last iterate's
    # evaluations (and the training) are exactly those of a run without it
    average = weight_average(agent, cfg.optim.ema_decay)
    if average is not None and resume_state is not None and resume_state.get("ema") is not None:
        average.load_state_dict(resume_state["ema"])
    eval_env = with_policy_state(make_env_from_config(cfg, num_envs=cfg.eval.episodes, seed=cfg.seed + 10_000), policy)
    averaged = None
    if average is not None:
        average_policy = policy_with(policy, average.module)
        averaged = WeightAverage(average, average_policy, with_policy_state(
            make_env_from_config(cfg, num_envs=cfg.eval.episodes, seed=cfg.seed + 10_000), average_policy))
    policy.random_actions = p.env_steps < cfg.replay.prefill  # before the workers' copy is taken: it travels with it
    collector = None
    if cc.backend != "direct":
        env.close()
        print(describe(cc, E), flush=True)
    batch_frames = total_envs(cfg) * cfg.train.steps_per_collect
    try:
        collector = make_collector(
            cc, make_env=functools.partial(worker_env, cfg, policy.primer_specs(), cfg.seed + p.env_steps),
            policy=acting_copy(policy, cc), frames_per_worker=E * cfg.train.steps_per_collect,
            total_frames=finite_frames(cfg.train.env_steps - p.env_steps, batch_frames), device=cfg.device,
            env=env if cc.backend == "direct" else None, learner_threads=learner_threads)
        if cc.backend == "direct":
            collector.set_seed(cfg.seed + p.env_steps)
        watchdog = WorkerWatchdog(collector)  # a dead worker process: an error and a checkpoint, not a hang
        pusher = WeightPusher(collector, policy, cc, watchdog)
        pusher.initial_push()
        learner_threads = keep_threads(learner_threads)
        run = TrainingRun(run_dir, run_cfg=cfg.run, total=cfg.train.env_steps, initial=p.env_steps, unit="step",
                          resume_state=resume_state, resume_step=p.env_steps, postfix=POSTFIX, curves=CURVES,
                          x_label="env steps (all envs together)")
    except BaseException:  # nothing may leave worker processes or Ray actors behind
        shutdown_quietly(collector)
        for e in (env, eval_env, *([averaged.env] if averaged else [])):
            e.close(raise_if_closed=False)
        raise
    window, metrics, completed, lr_mult = LogWindow(), {}, False, 1.0
    obs = [k for k in keys if k != policy.mask_key]
    finite_keys = [*obs, *(("next", k) for k in obs), ("next", "reward")]
    try:
        t0 = time.perf_counter()
        watchdog.__enter__()
        for batch in watchdog.iterate(collector):
            t1 = time.perf_counter()
            window.t_collect += t1 - t0
            keep_threads(learner_threads)
            check_tensordict_finite(batch, finite_keys, iteration=p.updates, run_dir=run.rd)
            for worker, chunk in worker_chunks(batch, E):  # one replay stream per env of every worker
                rb.extend(writer(chunk, first_env=worker * E))
            p.env_steps += batch.numel()  # the train ratio counts the frames received
            window.add_batch(batch, lag=pusher.lag(p.updates, batch))
            prefill_ended = policy.random_actions and p.env_steps >= cfg.replay.prefill
            if p.env_steps >= cfg.replay.prefill:
                policy.random_actions = False
                progress = run_progress(p.env_steps, cfg.train.env_steps, run.elapsed(), cfg.run.time_budget_s)
                lr_mult = set_learning_rates(update.optimizer, cfg.optim, progress)
                run_owed_updates(cfg, update, rb, p, window, run.rd, batch.numel(),
                                 average=averaged.model if averaged else None)
            pusher.after_batch(p.updates, force=prefill_ended)  # workers act with the new weights from here
            t0 = time.perf_counter()
            window.t_update += t0 - t1
            out_of_time = run.out_of_time()
            finished, stop_reason, evaluation = p.env_steps >= cfg.train.env_steps or out_of_time, "", None
            if (cfg.eval.every and p.env_steps >= p.next_eval) or finished:
                p.next_eval += cfg.eval.every or cfg.train.env_steps
                evaluation = evaluate_and_keep_best(cfg, policy, eval_env, agent, p, run, averaged)
                stop_at = cfg.eval.stop_at_return
                if stop_at is not None and evaluation["eval/episode_reward_sum"] >= stop_at:
                    stop_reason = f"eval return {evaluation['eval/episode_reward_sum']:.1f} >= {stop_at}"
                    finished = True
            if p.env_steps >= p.next_log or evaluation is not None or finished:
                p.next_log = p.env_steps + cfg.run.log_every
                metrics = {**window.row(run.elapsed()), **(evaluation or {}), "train/env_steps": p.env_steps,
                           "train/updates": p.updates, "train/lr_multiplier": lr_mult, "diag/replay_rows": len(rb),
                           "diag/random_actions": float(policy.random_actions), "diag/weight_pushes": pusher.pushes}
                run.log(metrics, step=p.env_steps)  # log, then checkpoint (see TrainingRun)
                window = LogWindow()
            if evaluation is not None and on_eval is not None:
                on_eval(dict(metrics))
            if p.env_steps >= p.next_ckpt or finished:
                p.next_ckpt += cfg.run.checkpoint_every
                run.save(checkpoint_state(cfg, agent, update, rb, writer, p, averaged))
            run.logger.advance(batch.numel())
            if finished:
                stop_reason = f"time budget of {cfg.run.time_budget_s:.0f} s reached" if out_of_time else stop_reason
                if stop_reason:
                    run.logger.write(f"stopping at {p.env_steps} env steps: {stop_reason}")
                completed = True
                break
            t0 = time.perf_counter()
    except WorkerFailedError as exc:  # raised in a wait on the collector: the learner's state is whole
        run.save(checkpoint_state(cfg, agent, update, rb, writer, p, averaged))
        run.logger.write(f"stopping at {p.env_steps} env steps: {exc}; checkpoint written (continue with --resume)")
        raise
    finally:
        watchdog.__exit__(None, None, None)
        run.close()
        shutdown_quietly(collector)  # closes env too; worker processes / Ray actors end here, also on errors
        for e in (env, eval_env, *([averaged.env] if averaged else [])):
            e.close(raise_if_closed=False)
    if completed and cfg.eval.confirm_episodes and run.is_main:
        confirm_policies(cfg, run.rd, agent, policy, p, average=averaged.model if averaged else None)
    return metrics


def confirm_policies(cfg: DreamerConfig, run_dir: str | Path, agent: DreamerAgent, policy: DreamerPolicy,
                     p: Progress, average=None) -> dict[str, Any]:
    """Scores the final weights and ``best.pt`` on ``eval.confirm_episodes`` fresh episodes each (same
    seeds for both, none used in training or in the periodic evaluations) and writes
    ``<run>/result.json`` naming the better file. A run's last policy is not always its best one,
    and a best-of-many 10-episode score flatters the policy behind it: this is the run's result.
    With a weight ``average`` the final weights are the average (what ``--evaluate`` plays) and the
    last iterate is scored too, for the record (``final_last``); ``agent`` ends holding the average."""
    run_dir, n, seed = Path(run_dir), cfg.eval.confirm_episodes, cfg.seed + 30_000
    also = None
    if average is not None:
        also = {"final_last": {k: v.detach().clone() for k, v in agent.state_dict().items()}}
        agent.load_state_dict(average.module.state_dict())
    return confirm_final_and_best(
        run_dir, episodes=n, seed=seed, networks=agent, final_env_steps=p.env_steps,
        make_env=lambda: with_policy_state(make_env_from_config(cfg, num_envs=n, seed=seed), policy),
        evaluate=lambda env: evaluate(policy, env, actions=cfg.eval.actions),
        best_file=run_dir / BEST_NAME if cfg.eval.keep_best else None,
        load_best=lambda state: load_weights(agent, state["agent"], BEST_NAME), checkpoint_name=CHECKPOINT_NAME,
        device=cfg.device, also=also)


POSTFIX = {"train/episode_reward_sum": "R", "eval/episode_reward_sum": "R_eval", "loss/world_model": "wm",
           "time/updates_per_s": "upd/s"}
CURVES = (
    ("episode reward sum", ("train/episode_reward_sum", "eval/episode_reward_sum")),
    ("world model", ("loss/reconstruction", "loss/reward", "loss/continue", "loss/dyn")),
    ("actor / critic", ("loss/actor", "loss/critic", "diag/actor_entropy", "diag/return_scale")),
    ("speed", ("time/updates_per_s",)),
)


def run_owed_updates(cfg: DreamerConfig, update: DreamerUpdate, rb, p: Progress, window: LogWindow, run_dir: str,
                     new_steps: int, average=None) -> None:
    """Adds what ``new_steps`` env steps owe (``replay.train_ratio`` replayed steps per env step) and runs
    the whole updates owed, each on a fresh ``[batch_size, seq_len]`` sample (moving the weight
    ``average``, if any, after each)."""
    B, L = cfg.replay.batch_size, cfg.replay.seq_len
    p.owed += new_steps * cfg.replay.train_ratio / (B * L)
    while p.owed >= 1.0:
        sample = rb.sample().reshape(B, L).to(cfg.device)
        window.add_update(update(sample, iteration=p.updates, run_dir=run_dir))
        if average is not None:
            average.update_parameters(update.agent)
        p.updates += 1
        p.owed -= 1.0


def evaluate_and_keep_best(cfg: DreamerConfig, policy: DreamerPolicy, eval_env: EnvBase, agent: DreamerAgent,
                           p: Progress, run: TrainingRun, averaged: WeightAverage | None = None) -> dict[str, float]:
    """Evaluation (after the non-finite guard); with ``eval.keep_best`` a new best score writes
    ``best.pt`` (the weights behind it: the policy at the end of a run is not always its best one).
    With ``averaged`` (:class:`WeightAverage`; ``optim.ema_decay``) the last
    iterate plays first (``eval/*_last``), then the average, whose score is the evaluation's. With
    ``eval.recheck_episodes`` a score above the best plays that many more episodes with the same
    weights first (``eval/recheck_*``: all episodes pooled), and the pooled score decides."""
    # sampled actions draw from generators of their own (seeded per evaluation), so the training's random
    # stream does not depend on how long the evaluation episodes were; mode evaluations draw from the
    # training's stream (the latent samples) as they always have, so earlier seeded runs repeat to the digit
    sampled = cfg.eval.actions == EvalActions.sample
    result = evaluate(policy, eval_env, actions=cfg.eval.actions,
                      seed=cfg.seed + 10_000 + p.updates if sampled else None)
    keys = ("eval/episode_reward_sum", "eval/episode_length")
    kept = agent
    if averaged is not None:
        last = {f"{k}_last": v for k, v in result.items() if k in keys}
        # its own seeded generators: the training's stream is the one a run without the average draws
        result = {**evaluate(averaged.policy, averaged.env, actions=cfg.eval.actions,
                             seed=cfg.seed + 40_000 + p.updates), **last}
        keys, kept = (*keys, *last), averaged.model.module
    metrics = run.evaluated(result, keys, iteration=p.updates)
    score = metrics["eval/episode_reward_sum"]
    if cfg.eval.keep_best and cfg.eval.recheck_episodes and math.isfinite(score) and score > p.best_return:
        # a new best on eval.episodes episodes: more episodes with the same weights decide whether it is one
        play = (averaged.policy, averaged.env) if averaged is not None else (policy, eval_env)
        pooled = recheck(result, lambda i: evaluate(*play, actions=cfg.eval.actions,
                                                    seed=cfg.seed + 50_000 + p.updates + i if sampled else None),
                         episodes=cfg.eval.recheck_episodes, per_round=cfg.eval.episodes)
        metrics.update(run.evaluated(pooled, iteration=p.updates))
        score = metrics["eval/recheck_episode_reward_sum"]
    if cfg.eval.keep_best and math.isfinite(score) and score > p.best_return:
        p.best_return = score
        run.save({"agent": kept.state_dict(), "env_steps": p.env_steps, "updates": p.updates,
                  "eval/episode_reward_sum": score,
                  "eval/episodes": metrics.get("eval/recheck_episodes", metrics.get("eval/episodes"))}, name=BEST_NAME)
    if cfg.eval.keep_best and math.isfinite(p.best_return):  # no -inf in metrics.jsonl before a finite score
        metrics["eval/best_episode_reward_sum"] = p.best_return
    return metrics


def checkpoint_state(cfg: DreamerConfig, agent: DreamerAgent, update: DreamerUpdate, rb, writer: SequenceWriter,
                     p: Progress, averaged: WeightAverage | None = None) -> dict:
    """What ``--resume`` needs (the replay rows in use with ``run.save_replay``; the weight average)."""
    return {
        "agent": agent.state_dict(), "optimizer": update.optimizer.state_dict(),
        "critic_loss": update.critic_loss.state_dict(), "actor_loss": update.actor_loss.state_dict(),
        "replay": replay_state_dict(rb) if cfg.run.save_replay else None,
        "writer": writer.state_dict() if cfg.run.save_replay else None,
        "env_steps": p.env_steps, "updates": p.updates, "owed": p.owed, "next_eval": p.next_eval,
        "next_ckpt": p.next_ckpt, "next_log": p.next_log, "best_return": p.best_return, "rng": rng_state(),
        "ema": averaged.model.state_dict() if averaged is not None else None,
    }


def evaluate_checkpoint(cfg: DreamerConfig, run_dir: Path) -> dict[str, float]:
    """Loads ``run_dir``'s checkpoint (or the checkpoint file ``run_dir``, e.g. ``<run>/best.pt``) and
    runs ``eval.episodes`` episodes (``eval.actions``: mode or sampled). Prints the JSON line and writes it to
    ``<run dir>/eval.json`` (``eval_best.json`` for ``best.pt``); a read-only run directory only
    costs the file (a note on stderr)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    state = load_checkpoint(run_dir, map_location=cfg.device)
    # a given checkpoint and seed always give the same numbers: the policy's latent samples come from
    # a generator seeded here, not from whatever state the caller's global RNG is in
    with torch.random.fork_rng(devices=[torch.device(cfg.device)] if torch.device(cfg.device).type == "cuda" else []):
        torch.manual_seed(cfg.seed + 20_000)
        env = make_env_from_config(cfg, num_envs=cfg.eval.episodes, seed=cfg.seed + 20_000)
        agent, policy = build_agent(cfg, env)
        load_weights(agent, averaged_weights(state), "checkpoint")  # the average, where the run kept one
        with_policy_state(env, policy)
        t0 = time.perf_counter()
        metrics = evaluate(policy, env, actions=cfg.eval.actions)
        metrics["time/eval_s"] = time.perf_counter() - t0
        env.close()
    # the numbers first: printed and saved to <run dir>/eval.json (eval_best.json for best.pt)
    run_dir, checkpoint, suffix = evaluation_paths(run_dir)
    report_evaluation({"run_dir": str(run_dir), "checkpoint": str(checkpoint), "env_steps": state["env_steps"],
                       "updates": state["updates"], "seed": cfg.seed, **metrics}, run_dir, f"eval{suffix}.json")
    return metrics


RECIPE_SPEC = Recipe(
    name=RECIPE, schema=DreamerConfig, config_dir=CONFIG_DIR, default_env="cartpole", description=__doc__,
    validate=validate, preflight=preflight, train=train, evaluate=evaluate_checkpoint,
    run_name=lambda cfg: (cfg.env.factory.replace(":", ".") if cfg.env.factory
                          else cfg.env.name + ("-pixels" if cfg.env.pixels else "")),
    progress=("env_steps", "train.env_steps", "env steps"), log_step="env_steps",
    required=("agent", "env_steps", "updates", "replay"), factory_env="custom",
    algo="dreamer", algos={"ppo": "recipes.ppo:main"},
)


main, cli = entry_points(RECIPE_SPEC)


if __name__ == "__main__":
    cli()
