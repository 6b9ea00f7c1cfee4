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

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torchrl.collectors import Collector
from torchrl.envs import EnvBase, TensorDictPrimer
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreamer.checkpoint import (
    CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_resume_state, rng_state, run_clock_start, save_checkpoint,
    set_rng_state,
)
from torchrl_dreamer.cli import parse_recipe_args
from torchrl_dreamer.config import ConfigError, check_ranges, doc, to_object
from torchrl_dreamer.cpu import compile_unavailable, inductor_options, tune_malloc
from torchrl_dreamer.dreamer.config import OptimConfig, WorldModelLossConfig
from torchrl_dreamer.dreamer.agent import PRESETS, DreamerAgent, DreamerPolicy, make_agent, preset
from torchrl_dreamer.dreamer.envs import make_dreamer_env
from torchrl_dreamer.dreamer.imagination import ImaginationModule
from torchrl_dreamer.dreamer.losses import DreamerPolicyLoss, DreamerCriticLoss, DreamerWorldModelLoss
from torchrl_dreamer.dreamer.replay import (SequenceWriter, load_replay_state_dict, make_replay_buffer,
                                           replay_state_dict)
from torchrl_dreamer.dreamer.update import DreamerUpdate, make_optimizer
from torchrl_dreamer.guards import check_metrics_finite, check_tensordict_finite
from torchrl_dreamer.logging import RunLogger
from torchrl_dreamer.evaluation import evaluation_paths, report_evaluation
from torchrl_dreamer.plots import plot_learning_curves
from torchrl_dreamer.runtime import check_device, open_run_dir, run_cli

CONFIG_DIR = Path(__file__).parent / "configs" / "dreamer"
RECIPE = "dreamer"
BEST_NAME = "best.pt"  # eval.keep_best: the weights behind the best evaluation of a run


# --- config -----------------------------------------------------------------------------------


@dataclass
class EnvConfig:
    name: str = doc("CartPole-v1", "Gymnasium env id (ignored when env.factory is set).")
    factory: str = doc("", "Custom env 'package.module:function' returning a TorchRL EnvBase (see README).")
    kwargs: Dict[str, Any] = doc({}, "Keyword arguments for gymnasium.make or the factory.")
    pixels: bool = doc(False, "Observe rendered frames, resized to 3x64x64 uint8 in the env transform.")
    obs_keys: List[str] = doc([], "Observation keys the world model encodes ([] = ['pixels'] or ['observation']).")
    num_envs: int = doc(4, "Envs stepped together (TorchRL SerialEnv).")
    max_episode_steps: int = doc(0, "Episode step limit (0 = the env's own).")


@dataclass
class ModelConfig:
    size: str = doc("tiny", "Size preset: tiny, xs, s, m, l (DreamerV3 paper widths from xs up).")
    deter: int = doc(0, "Override: GRU state size (0 = preset).")
    hidden: int = doc(0, "Override: GRU input/hidden size (0 = preset).")
    units: int = doc(0, "Override: MLP width of encoder/decoder/heads/actor/critic (0 = preset).")
    layers: int = doc(0, "Override: MLP layers (0 = preset).")
    stoch: int = doc(0, "Override: number of categorical latents G (0 = preset).")
    classes: int = doc(0, "Override: classes per latent C (0 = preset).")
    blocks: int = doc(0, "Override: GRU blocks (0 = preset).")
    cnn_depth: int = doc(0, "Override: channels of the first conv layer (0 = preset).")
    unimix: float = doc(0.01, "Uniform mix of latent and (discrete) policy distributions.")
    compile: bool = doc(False, "torch.compile parts of the update (optional; see compile_mode; measure first).")
    compile_mode: str = doc("step", "With compile=true: step (the RSSM scan step and the imagination step) or full "
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
    actor_grad: str = doc("reinforce", "reinforce (any action space) or dynamics (continuous: backprop through the model).")
    start_fraction: float = doc(1.0, "Imagine from this fraction of the replayed states (1 = all, as the paper; CPU knob).")
    cont_mode: str = doc("prob", "Imagined continue flag: prob (continue-head probability, 2024 reference) or mode (0/1).")
    slow_critic_fraction: float = doc(0.02, "EMA fraction of the slow critic per update.")
    slow_reg_scale: float = doc(1.0, "Weight of the critic's regulariser towards the slow critic.")
    replay_value_scale: float = doc(0.0, "Weight of the replay-value critic loss (0 = off; 2024 reference: 0.3).")
    return_decay: float = doc(0.99, "EMA decay of the return percentile range.")


@dataclass
class ReplayConfig:
    capacity: int = doc(1_000_000, "Replay capacity in rows (env steps + one per finished episode).")
    batch_size: int = doc(16, "Sequences per update.")
    seq_len: int = doc(64, "Steps per sequence (may cross episode boundaries, marked by is_first).")
    train_ratio: float = doc(512.0, "Replayed steps per env step (updates = env steps * ratio / (batch * seq_len)).")
    prefill: int = doc(2500, "Env steps with uniformly random actions before the first update.")


@dataclass
class TrainConfig:
    env_steps: int = doc(50_000, "Total env steps (all envs together).")
    steps_per_collect: int = doc(16, "Steps per env per collector batch (updates are interleaved between batches).")


@dataclass
class EvalConfig:
    every: int = doc(5000, "Evaluate every N env steps (0 = only at the end).")
    episodes: int = doc(10, "Evaluation episodes (run in parallel, mode actions).")
    stop_at_return: Optional[float] = doc(None, "Stop training once the eval mean reaches this (null = never).")
    keep_best: bool = doc(True, "After each evaluation that beats every earlier one, write the weights to "
                                "<run>/best.pt (score it with --evaluate <run>/best.pt).")


@dataclass
class RunConfig:
    root: str = doc("runs", "Runs go to <root>/dreamer/<env>/<timestamp>/.")
    log_every: int = doc(1000, "Log scalars every N env steps.")
    checkpoint_every: int = doc(10_000, "Write the checkpoint every N env steps (and at the end).")
    save_replay: bool = doc(True, "Keep the replay buffer in the checkpoint (exact resume; larger file).")
    time_budget_s: float = doc(0.0, "Stop after this many seconds of training (0 = no limit; counts across --resume).")
    tensorboard: bool = doc(True, "Write TensorBoard events.")
    progress: bool = doc(True, "Show the tqdm progress bar.")


@dataclass
class DreamerConfig:
    seed: int = doc(0, "Seed for torch, numpy, python and the envs.")
    device: str = doc("cpu", "Device of the networks and updates (cpu, cuda, ...); envs and replay stay on CPU.")
    threads: int = doc(0, "torch intra-op threads (0 = torch's default).")
    tune_malloc: bool = doc(True, "Keep freed memory in the process (glibc mallopt; faster large tensors, see torchrl_dreamer/cpu.py).")
    env: EnvConfig = doc(EnvConfig(), "Environment.")
    model: ModelConfig = doc(ModelConfig(), "Network sizes.")
    loss: WorldModelLossConfig = doc(WorldModelLossConfig(), "World-model loss.")
    ac: ActorCriticConfig = doc(ActorCriticConfig(), "Imagination, actor and critic.")
    optim: OptimConfig = doc(OptimConfig(), "Optimiser (LaProp + AGC, TorchRL's DreamerV3Optimizer).")
    replay: ReplayConfig = doc(ReplayConfig(), "Replay buffer and train ratio.")
    train: TrainConfig = doc(TrainConfig(), "Training length and collection.")
    eval: EvalConfig = doc(EvalConfig(), "Evaluation.")
    run: RunConfig = doc(RunConfig(), "Run directory, logging and checkpoints.")


def validate(cfg: DreamerConfig) -> None:
    """Checks values the type system cannot, before any run directory or env is created."""
    choices = {
        "model.size": (cfg.model.size, tuple(PRESETS)),
        "loss.free_bits_grad": (cfg.loss.free_bits_grad, ("clip", "straight_through")),
        "ac.actor_grad": (cfg.ac.actor_grad, ("reinforce", "dynamics")),
        "ac.cont_mode": (cfg.ac.cont_mode, ("prob", "mode")),
        "model.compile_mode": (cfg.model.compile_mode, ("step", "full")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got '{value}'")
    check_ranges(cfg, {
        "env.num_envs": ">= 1", "env.max_episode_steps": ">= 0", "threads": ">= 0",
        "model.deter": ">= 0", "model.hidden": ">= 0", "model.units": ">= 0", "model.layers": ">= 0",
        "model.stoch": ">= 0", "model.classes": ">= 0", "model.blocks": ">= 0", "model.cnn_depth": ">= 0",
        "model.unimix": "[0, 1)",
        "loss.dyn_scale": ">= 0", "loss.rep_scale": ">= 0", "loss.free_bits": ">= 0",
        "loss.reconstruction_scale": ">= 0", "loss.reward_scale": ">= 0", "loss.continue_scale": ">= 0",
        "loss.terminal_weight": "> 0",
        "ac.horizon": ">= 1", "ac.discount": "(0, 1]", "ac.lmbda": "[0, 1]", "ac.entropy_coef": ">= 0",
        "ac.start_fraction": "(0, 1]", "ac.slow_critic_fraction": "(0, 1]", "ac.slow_reg_scale": ">= 0",
        "ac.replay_value_scale": ">= 0", "ac.return_decay": "[0, 1)",
        "optim.world_model_lr": "> 0", "optim.actor_lr": "> 0", "optim.critic_lr": "> 0", "optim.agc": "> 0",
        "optim.eps": "> 0", "optim.warmup_steps": ">= 0",
        "replay.capacity": ">= 1", "replay.batch_size": ">= 1", "replay.seq_len": ">= 2",
        "replay.train_ratio": "> 0", "replay.prefill": ">= 0",
        "train.env_steps": ">= 1", "train.steps_per_collect": ">= 1",
        "eval.every": ">= 0", "eval.episodes": ">= 1",
        "run.log_every": ">= 1", "run.checkpoint_every": ">= 1", "run.time_budget_s": ">= 0",
    })
    if cfg.replay.capacity < cfg.replay.batch_size * cfg.replay.seq_len:
        raise ConfigError("replay.capacity is smaller than one batch (batch_size * seq_len)")
    if cfg.replay.prefill < cfg.env.num_envs * cfg.replay.seq_len:
        raise ConfigError(f"replay.prefill ({cfg.replay.prefill}) must be at least env.num_envs * replay.seq_len "
                          f"({cfg.env.num_envs} x {cfg.replay.seq_len} = {cfg.env.num_envs * cfg.replay.seq_len}) env "
                          "steps, so that every env's stream holds one whole sequence before the first update")
    if cfg.eval.stop_at_return is not None and not math.isfinite(cfg.eval.stop_at_return):
        raise ConfigError(f"eval.stop_at_return must be finite or null, got {cfg.eval.stop_at_return}")
    if cfg.env.pixels and cfg.env.obs_keys and cfg.env.obs_keys != ["pixels"]:
        raise ConfigError("env.pixels=true observes 'pixels' only; leave env.obs_keys empty")
    if not cfg.env.factory:
        from torchrl_dreamer.dreamer.envs import gym_env_ids

        if cfg.env.name not in gym_env_ids():
            raise ConfigError(f"unknown Gymnasium env id '{cfg.env.name}' (env.name)")
    check_device(cfg.device)


def preflight(cfg: DreamerConfig, resume_state: Optional[dict]) -> None:
    """Builds what can fail before anything is written: the env (factory import and call), the
    agent from its specs and, on resume, the checkpoint's weights loaded into it (shapes)."""
    env = make_env_from_config(cfg, num_envs=cfg.env.num_envs, seed=cfg.seed)
    try:
        agent, _ = build_agent(cfg, env)
        if resume_state is not None:
            load_weights(agent, resume_state["agent"], "checkpoint")
            replay = resume_state.get("replay") or {}
            rows = int(replay.get("_storage", {}).get("_len", 0)) if replay.get("_format") else 0
            if rows > cfg.replay.capacity:
                raise ConfigError(f"replay.capacity={cfg.replay.capacity} is smaller than the {rows} replay rows in "
                                  f"the checkpoint; resume with replay.capacity >= {rows}")
    finally:
        env.close(raise_if_closed=False)


def load_weights(module: torch.nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` with a :class:`CheckpointError` that says what to do when
    the checkpoint was written by a differently sized model."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), first[0] if first else "")
        raise CheckpointError(f"the {what}'s weights do not fit the model this config builds ({detail[:240]}); "
                              "resume without model.* / env.* overrides that change network sizes") from None


# --- factories ---------------------------------------------------------------------------------


def model_sizes(cfg: ModelConfig):
    overrides = {k: getattr(cfg, k) for k in ("deter", "hidden", "units", "layers", "stoch", "classes", "blocks",
                                              "cnn_depth") if getattr(cfg, k)}
    return preset(cfg.size, **overrides)


def make_env_from_config(cfg: DreamerConfig, *, num_envs: int, seed: int) -> EnvBase:
    return make_dreamer_env(env_id=cfg.env.name, factory=cfg.env.factory, num_envs=num_envs, pixels=cfg.env.pixels,
                            seed=seed, max_episode_steps=cfg.env.max_episode_steps, kwargs=cfg.env.kwargs)


def obs_keys(cfg: DreamerConfig) -> list[str]:
    return list(cfg.env.obs_keys) or (["pixels"] if cfg.env.pixels else ["observation"])


def action_space(env: EnvBase) -> tuple[int, bool, Any, Any]:
    """``(action_dim, discrete, low, high)`` from the env's action spec (one-hot or box)."""
    from torchrl.data import Bounded, OneHot

    spec = env.action_spec_unbatched
    if isinstance(spec, OneHot):
        return spec.shape[-1], True, None, None
    if isinstance(spec, Bounded):
        return spec.shape[-1], False, spec.space.low, spec.space.high
    raise ConfigError(f"the Dreamer recipe needs a one-hot (discrete) or bounded box action spec; got {type(spec).__name__}")


def build_agent(cfg: DreamerConfig, env: EnvBase) -> tuple[DreamerAgent, DreamerPolicy]:
    keys = obs_keys(cfg)
    spec = env.observation_spec
    shapes = {}
    for key in keys:
        if key not in spec.keys():
            raise ConfigError(f"observation key '{key}' not in the env's observation spec: {list(spec.keys())}")
        shapes[key] = tuple(spec[key].shape[len(env.batch_size):])
    action_dim, discrete, low, high = action_space(env)
    agent = make_agent(shapes, action_dim, discrete, model_sizes(cfg.model), cfg.model.unimix).to(cfg.device)
    policy = DreamerPolicy(agent.world_model, agent.actor, obs_keys={k: k for k in keys},
                           action_low=low, action_high=high).to(cfg.device)
    return agent, policy


def build_update(cfg: DreamerConfig, agent: DreamerAgent) -> DreamerUpdate:
    lc, ac = cfg.loss, cfg.ac
    wm_loss = DreamerWorldModelLoss(agent.world_model, dyn_scale=lc.dyn_scale, rep_scale=lc.rep_scale, free_bits=lc.free_bits,
                             free_bits_grad=lc.free_bits_grad, reconstruction_scale=lc.reconstruction_scale,
                             reward_scale=lc.reward_scale, continue_scale=lc.continue_scale,
                             terminal_weight=lc.terminal_weight)
    critic_loss = DreamerCriticLoss(agent.critic, slow_fraction=ac.slow_critic_fraction, slow_reg_scale=ac.slow_reg_scale,
                             replay_scale=ac.replay_value_scale)
    actor_loss = DreamerPolicyLoss(agent.actor, entropy_coef=ac.entropy_coef, actor_grad=ac.actor_grad,
                           critic=agent.critic if ac.actor_grad == "dynamics" else None, return_decay=ac.return_decay)
    for loss in (critic_loss, actor_loss):
        loss.make_value_estimator(gamma=ac.discount, lmbda=ac.lmbda)
    imagination = ImaginationModule(agent.world_model, agent.actor, ac.horizon, start_fraction=ac.start_fraction,
                                    grad=ac.actor_grad == "dynamics", cont_mode=ac.cont_mode)
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


@torch.no_grad()
def evaluate(policy: DreamerPolicy, env: EnvBase, *, max_steps: int = 100_000) -> dict[str, float]:
    """One episode per env of ``env`` (run in parallel) with mode actions. Returns the mean episode
    reward SUM and length over those episodes."""
    n = max(1, env.batch_size.numel())
    returns = torch.full((n,), float("nan"))
    lengths = torch.zeros(n)
    finished = torch.zeros(n, dtype=torch.bool)
    was_random = policy.random_actions
    policy.random_actions = False
    device = next(policy.parameters()).device  # the env stays on the CPU; the policy may be on cfg.device
    td = env.reset()
    env_device = env.device if env.device is not None else td.get("done").device  # custom envs may say None
    move = torch.device(env_device) != device  # on one device, no per-step copies
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(max_steps):
            td = policy(td.to(device)).to(env_device) if move else policy(td)
            td, td_next = env.step_and_maybe_reset(td)
            done = td["next", "done"].reshape(n)
            lengths += (~finished).float()
            new = done & ~finished
            returns[new] = td["next", "episode_reward"].reshape(n)[new].float()
            finished |= done
            if bool(finished.all()):
                break
            td = td_next
    policy.random_actions = was_random
    return {"eval/episode_reward_sum": returns[finished].mean().item(), "eval/episode_length": lengths.mean().item(),
            "eval/episodes": float(finished.sum())}


# --- training ----------------------------------------------------------------------------------


class _Averager:
    """Sums of metric tensors between two logs (one host sync per log, not per update)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v.detach().float() if k in self.sums else v.detach().float().clone()
        self.count += 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / self.count for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return out


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


def train(cfg: DreamerConfig, run_dir: Path, resume_state: Optional[dict] = None,
          on_eval: Optional[Callable[[dict[str, float]], None]] = None) -> dict[str, float]:
    """Trains until ``train.env_steps`` (or the time budget, or ``eval.stop_at_return``); returns the
    last logged metrics. ``on_eval(metrics)`` is called after each evaluation (benchmarks)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_malloc:
        tune_malloc()
    torch.manual_seed(cfg.seed)
    env = make_env_from_config(cfg, num_envs=cfg.env.num_envs, seed=cfg.seed)
    agent, policy = build_agent(cfg, env)
    with_policy_state(env, policy)
    if cfg.model.compile:
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
    update = build_update(cfg, agent)
    rb = make_replay_buffer(cfg.replay.capacity, cfg.replay.batch_size, cfg.replay.seq_len)
    keys = obs_keys(cfg)
    writer = SequenceWriter({k: k for k in keys}, policy.from_env_action, cfg.env.num_envs)
    B, L = cfg.replay.batch_size, cfg.replay.seq_len

    env_steps, updates, owed, next_eval, next_ckpt, next_log = 0, 0, 0.0, cfg.eval.every, cfg.run.checkpoint_every, cfg.run.log_every
    best_return = -math.inf  # best evaluation so far (eval.keep_best)
    if resume_state is not None:
        load_weights(agent, resume_state["agent"], "checkpoint")
        update.optimizer.load_state_dict(resume_state["optimizer"])
        update.critic_loss.load_state_dict(resume_state["critic_loss"])
        update.actor_loss.load_state_dict(resume_state["actor_loss"])
        if resume_state.get("replay") is not None:
            load_replay_state_dict(rb, resume_state["replay"])  # also reads older full-capacity states
            writer.load_state_dict(resume_state["writer"])
        # the envs restart: new streams so no replay window joins the old and the new episodes
        writer.stream_offset += cfg.env.num_envs
        writer.carry_reward.zero_()
        env_steps, updates, owed = resume_state["env_steps"], resume_state["updates"], resume_state["owed"]
        next_eval, next_ckpt, next_log = resume_state["next_eval"], resume_state["next_ckpt"], resume_state["next_log"]
        best_return = resume_state.get("best_return", -math.inf)  # absent in checkpoints written before keep_best
        best_return = max(best_return, best_score_on_disk(run_dir))
        set_rng_state(resume_state["rng"])
    if env_steps >= cfg.train.env_steps:
        raise ConfigError(f"nothing to do: the run already has {env_steps} env steps; raise train.env_steps")
    eval_env = with_policy_state(make_env_from_config(cfg, num_envs=cfg.eval.episodes, seed=cfg.seed + 10_000), policy)
    frames_per_batch = cfg.env.num_envs * cfg.train.steps_per_collect
    collector = Collector(env, policy, frames_per_batch=frames_per_batch, total_frames=-1,
                          env_device="cpu", policy_device=cfg.device, storing_device="cpu",
                          auto_register_policy_transforms=False)  # InitTracker + primer are already there
    collector.set_seed(cfg.seed + env_steps)
    rd = str(run_dir)

    def save() -> None:
        save_checkpoint(run_dir / CHECKPOINT_NAME, keep_previous=True, state={
            "agent": agent.state_dict(), "optimizer": update.optimizer.state_dict(),
            "critic_loss": update.critic_loss.state_dict(), "actor_loss": update.actor_loss.state_dict(),
            "replay": replay_state_dict(rb) if cfg.run.save_replay else None,
            "writer": writer.state_dict() if cfg.run.save_replay else None,
            "env_steps": env_steps, "updates": updates, "owed": owed, "next_eval": next_eval,
            "next_ckpt": next_ckpt, "next_log": next_log, "best_return": best_return, "rng": rng_state(),
            "elapsed_s": time.perf_counter() - t_start,
        })

    def save_best(score: float) -> None:
        """The weights behind the best evaluation so far (what ``--evaluate`` needs, no optimizer or
        replay): the policy at the end of a run is not always its best one."""
        save_checkpoint(run_dir / BEST_NAME, {"agent": agent.state_dict(), "env_steps": env_steps,
                                              "updates": updates, "eval/episode_reward_sum": score})

    logger = RunLogger(run_dir, total=cfg.train.env_steps, initial=env_steps, unit="step",
                       postfix_keys={"train/episode_reward_sum": "R", "eval/episode_reward_sum": "R_eval",
                                     "loss/world_model": "wm", "time/updates_per_s": "upd/s"},
                       tensorboard=cfg.run.tensorboard, progress=cfg.run.progress,
                       purge_step=env_steps + 1 if resume_state is not None else None)
    averager = _Averager()
    episode_sums: list[float] = []
    episode_lengths: list[float] = []
    metrics: dict[str, float] = {}
    t_start = run_clock_start(resume_state, cfg.run.time_budget_s)  # training seconds continue across --resume
    t_collect = t_update = 0.0
    updates_since, steps_since, t_window = 0, 0, time.perf_counter()
    policy.random_actions = env_steps < cfg.replay.prefill
    finite_keys = [*keys, *(("next", k) for k in keys), ("next", "reward")]
    stop_reason = ""
    try:
        t0 = time.perf_counter()
        for batch in collector:
            t1 = time.perf_counter()
            t_collect += t1 - t0
            check_tensordict_finite(batch, finite_keys, iteration=updates, run_dir=rd)
            rb.extend(writer(batch))
            n_new = batch.numel()
            env_steps += n_new
            steps_since += n_new
            done = batch["next", "done"].reshape(-1)
            if bool(done.any()):
                episode_sums += batch["next", "episode_reward"].reshape(-1)[done].tolist()
                if ("next", "step_count") in batch.keys(True):
                    episode_lengths += batch["next", "step_count"].reshape(-1)[done].float().tolist()
            if env_steps >= cfg.replay.prefill:
                policy.random_actions = False
                owed += n_new * cfg.replay.train_ratio / (B * L)
                while owed >= 1.0:
                    sample = rb.sample().reshape(B, L).to(cfg.device)
                    averager.add(update(sample, iteration=updates, run_dir=rd))
                    updates += 1
                    updates_since += 1
                    owed -= 1.0
            t0 = time.perf_counter()
            t_update += t0 - t1
            out_of_time = 0 < cfg.run.time_budget_s <= t0 - t_start
            finished = env_steps >= cfg.train.env_steps or out_of_time
            evaluated = False
            if (cfg.eval.every and env_steps >= next_eval) or finished:
                next_eval += cfg.eval.every or cfg.train.env_steps
                metrics = evaluate(policy, eval_env)
                check_metrics_finite(metrics, ("eval/episode_reward_sum", "eval/episode_length"),
                                     iteration=updates, run_dir=rd)
                evaluated = True
                score = metrics["eval/episode_reward_sum"]
                if cfg.eval.keep_best and math.isfinite(score) and score > best_return:
                    best_return = score
                    save_best(score)
                if cfg.eval.keep_best and math.isfinite(best_return):  # no -inf in metrics.jsonl before a finite score
                    metrics["eval/best_episode_reward_sum"] = best_return
                if cfg.eval.stop_at_return is not None and metrics["eval/episode_reward_sum"] >= cfg.eval.stop_at_return:
                    stop_reason = f"eval return {metrics['eval/episode_reward_sum']:.1f} >= {cfg.eval.stop_at_return}"
                    finished = True
            if env_steps >= next_log or evaluated or finished:
                next_log = env_steps + cfg.run.log_every
                now = time.perf_counter()
                window = max(now - t_window, 1e-9)
                log = {**averager.pop(), **(metrics if evaluated else {})}
                log.update({
                    "train/env_steps": env_steps, "train/updates": updates,
                    "train/episode_reward_sum": sum(episode_sums) / len(episode_sums) if episode_sums else math.nan,
                    "train/episodes_finished": len(episode_sums),
                    "diag/replay_rows": len(rb), "diag/random_actions": float(policy.random_actions),
                    "time/updates_per_s": updates_since / max(t_update, 1e-9) if updates_since else 0.0,
                    "time/env_steps_per_s": steps_since / window, "time/collect_s": t_collect,
                    "time/update_s": t_update, "time/total_s": now - t_start,
                })
                if episode_lengths:
                    log["train/episode_length"] = sum(episode_lengths) / len(episode_lengths)
                logger.log(log, step=env_steps)
                metrics = log
                episode_sums, episode_lengths = [], []
                updates_since, steps_since, t_window, t_collect, t_update = 0, 0, now, 0.0, 0.0
            if evaluated and on_eval is not None:
                on_eval(dict(metrics))
            if env_steps >= next_ckpt or finished:
                next_ckpt += cfg.run.checkpoint_every
                save()
            logger.advance(n_new)
            if finished:
                if out_of_time:
                    stop_reason = f"time budget of {cfg.run.time_budget_s:.0f} s reached"
                if stop_reason:
                    logger.write(f"stopping at {env_steps} env steps: {stop_reason}")
                break
            t0 = time.perf_counter()
    finally:
        logger.close()
        try:
            plot_learning_curves(run_dir, panels=(
                ("episode reward sum", ("train/episode_reward_sum", "eval/episode_reward_sum")),
                ("world model", ("loss/reconstruction", "loss/reward", "loss/continue", "loss/dyn")),
                ("actor / critic", ("loss/actor", "loss/critic", "diag/actor_entropy", "diag/return_scale")),
                ("speed", ("time/updates_per_s",)),
            ), x_label="env steps (all envs together)")  # logged step = env_steps
        except Exception as exc:  # plotting must never hide the real outcome
            print(f"warning: could not plot learning curves: {exc}", file=sys.stderr)
        collector.shutdown()  # closes env too
        for e in (env, eval_env):
            e.close(raise_if_closed=False)
    return metrics


def evaluate_checkpoint(cfg: DreamerConfig, run_dir: Path) -> dict[str, float]:
    """Loads ``run_dir``'s checkpoint (or the checkpoint file ``run_dir``, e.g. ``<run>/best.pt``) and
    runs ``eval.episodes`` episodes with mode actions. Prints the JSON line and writes it to
    ``<run dir>/eval.json`` (``eval_best.json`` for ``best.pt``); a read-only run directory only
    costs the file (a note on stderr)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    state = load_checkpoint(run_dir, map_location=cfg.device)
    env = make_env_from_config(cfg, num_envs=cfg.eval.episodes, seed=cfg.seed + 20_000)
    agent, policy = build_agent(cfg, env)
    load_weights(agent, state["agent"], "checkpoint")
    with_policy_state(env, policy)
    t0 = time.perf_counter()
    metrics = evaluate(policy, env)
    metrics["time/eval_s"] = time.perf_counter() - t0
    env.close()
    # the numbers first: printed and saved to <run dir>/eval.json (eval_best.json for best.pt)
    run_dir, checkpoint, suffix = evaluation_paths(run_dir)
    report_evaluation({"run_dir": str(run_dir), "checkpoint": str(checkpoint), "env_steps": state["env_steps"],
                       "updates": state["updates"], "seed": cfg.seed, **metrics}, run_dir, f"eval{suffix}.json")
    return metrics


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_recipe_args(argv, schema=DreamerConfig, config_dir=CONFIG_DIR, description=__doc__,
                             default_env="cartpole")
    cfg: DreamerConfig = to_object(args.cfg)
    validate(cfg)
    if args.evaluate is not None:
        evaluate_checkpoint(cfg, args.evaluate)
        return args.evaluate
    resume_state = None
    if args.resume is not None:
        resume_state, _ = load_resume_state(args.resume, map_location="cpu",
                                            required=("agent", "env_steps", "updates", "replay"))
        if resume_state["env_steps"] >= cfg.train.env_steps:
            raise ConfigError(f"nothing to do: the run already has {resume_state['env_steps']} env steps; "
                              "raise train.env_steps")
        run_clock_start(resume_state, cfg.run.time_budget_s)  # a spent time budget: nothing to do
    preflight(cfg, resume_state)  # nothing is written before this passes
    name = cfg.env.factory.replace(":", ".") if cfg.env.factory else cfg.env.name + ("-pixels" if cfg.env.pixels else "")
    run_dir, lock = open_run_dir(args.cfg, root=cfg.run.root, recipe=RECIPE, name=name, resume=args.resume,
                                 last_step=resume_state["env_steps"] if resume_state is not None else None)
    print(f"run directory: {run_dir}", flush=True)
    try:
        train(cfg, run_dir, resume_state)
    finally:
        lock.release()
    return run_dir


def cli() -> None:
    """Console-script entry point: ``main`` with one-line errors and exit codes (see torchrl_dreamer.runtime)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
