"""PPO on any single-agent env: Gymnasium ids (vector or pixel observations) or a TorchRL factory,
discrete (``Categorical``/``OneHot``, with an optional ``action_mask``) or continuous (``Bounded``).

    python -m recipes.ppo --env cartpole                                # state CartPole-v1
    python -m recipes.dreamer --algo ppo --env cartpole                 # the same, from the Dreamer command
    python -m recipes.ppo --env custom                                  # envs/masked_grid.py (masked actions)
    python -m recipes.ppo --env custom env.factory=mypkg.myenv:make_env
    python -m recipes.ppo --resume runs/ppo/CartPole-v1/<stamp> train.env_steps=300000
    python -m recipes.ppo --evaluate runs/ppo/CartPole-v1/<stamp>

TorchRL end to end: the env is built exactly as for Dreamer (``make_dreamer_env``: same
transforms, same ``episode_reward`` sums, same contract check), a ``Collector`` gathers
``env.num_envs x train.steps_per_env`` steps per iteration, ``GAE`` computes advantages and
``ClipPPOLoss`` the loss (``ProbabilisticActor`` with ``OneHotCategorical``,
``MaskedOneHotCategorical`` when the env has an action mask, or ``TanhNormal`` in the env's bounds;
a ``ValueOperator`` critic). Metrics, run layout, checkpoints, ``--resume``/``--evaluate``, the
non-finite guards and ``best.pt`` are the Dreamer recipe's, so both algorithms compare in one
TensorBoard (``train/episode_reward_sum``, ``eval/episode_reward_sum`` over ``train/env_steps``).

Layers: ``configs/ppo/base.yaml`` <- ``configs/ppo/<env>.yaml`` <- CLI overrides.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import EnvBase

from torchrl_dreamer.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_weights, rng_state, set_rng_state
from torchrl_dreamer.config import Choice, ConfigError, check_ranges, doc
from torchrl_dreamer.dreamer.config import SingleAgentEnvConfig
from torchrl_dreamer.dreamer.envs import make_dreamer_env
from torchrl_dreamer.evaluation import (EvalActions, confirm_final_and_best, evaluation_paths, recheck,
                                        report_evaluation, run_episodes)
from torchrl_dreamer.guards import NonFiniteError, check_parameters_finite, check_tensordict_finite
from torchrl_dreamer.runtime import check_device
from torchrl_dreamer.trainer import EvalConfig, Recipe, RunConfig, TrainingRun, entry_points

CONFIG_DIR = Path(__file__).parent / "configs" / "ppo"
RECIPE = "ppo"
BEST_NAME = "best.pt"


# --- config -----------------------------------------------------------------------------------


@dataclass
class PPOEnvConfig(SingleAgentEnvConfig):
    num_envs: int = doc(8, "Envs stepped together (TorchRL SerialEnv for Gymnasium ids; the factory's num_envs).")


class Activation(Choice):
    """Hidden-layer activation."""
    tanh = "tanh"
    relu = "relu"
    silu = "silu"


@dataclass
class PPOModelConfig:
    hidden: int = doc(64, "Units per hidden layer (actor and critic each).")
    layers: int = doc(2, "Hidden layers.")
    activation: Activation = doc(Activation.tanh, "Hidden activation.")
    cnn_depth: int = doc(16, "Channels of the first conv layer for pixel observations (doubles per layer).")


@dataclass
class PPOLossConfig:
    lr: float = doc(3e-4, "Adam learning rate (actor and critic).")
    anneal_lr: bool = doc(True, "Decay the learning rate linearly to 0 over train.env_steps.")
    gamma: float = doc(0.99, "Discount.")
    lmbda: float = doc(0.95, "GAE lambda.")
    clip_epsilon: float = doc(0.2, "PPO clip range.")
    entropy_coef: float = doc(0.01, "Entropy bonus.")
    critic_coef: float = doc(0.5, "Weight of the critic loss.")
    epochs: int = doc(4, "Passes over each collected batch.")
    minibatch_size: int = doc(256, "Steps per minibatch.")
    max_grad_norm: float = doc(0.5, "Gradient clipping (global norm).")
    normalize_advantage: bool = doc(True, "Normalise advantages per minibatch.")


@dataclass
class PPOTrainConfig:
    env_steps: int = doc(200_000, "Total env steps (all envs together).")
    steps_per_env: int = doc(128, "Steps per env per iteration (batch = env.num_envs x steps_per_env).")


@dataclass
class PPOEvalConfig(EvalConfig):
    every: int = doc(20_000, "Evaluate every N env steps (0 = only at the end).")
    episodes: int = doc(10, "Evaluation episodes (run in parallel).")
    actions: EvalActions = doc(EvalActions.mode, "Actions in every evaluation (periodic, end-of-run, --evaluate): "
                                                 "mode = the actor's most likely action; sample = drawn from the "
                                                 "actor as in training.")
    stop_at_return: Optional[float] = doc(None, "Stop training once the eval mean reaches this (null = never).")
    keep_best: bool = doc(True, "Write the weights behind the best evaluation to <run>/best.pt.")
    recheck_episodes: int = doc(0, "With keep_best: an evaluation that beats the best so far plays this many more "
                                   "episodes with the same weights, and the mean over all of them decides best.pt "
                                   "(as the Dreamer recipe's eval.recheck_episodes; 0 = off).")
    confirm_episodes: int = doc(50, "At the end of a run, score the final weights and best.pt on this many fresh "
                                    "episodes each and write <run>/result.json naming the better (0 = skip).")


@dataclass
class PPORunConfig(RunConfig):
    checkpoint_every: int = doc(50_000, "Write the checkpoint every N env steps (and at the end).")
    time_budget_s: float = doc(0.0, "Stop after this many seconds of training (0 = no limit; counts across --resume).")
    log_every: int = doc(5000, "Log scalars every N env steps.")


@dataclass
class PPOConfig:
    """Every default of the PPO recipe; ``configs/ppo/<env>.yaml`` sets what differs per env."""
    seed: int = doc(0, "Seed for torch, numpy, python and the envs.")
    device: str = doc("cpu", "Device of the networks and updates (cpu, cuda, ...); envs stay on CPU.")
    threads: int = doc(0, "torch intra-op threads (0 = torch's default).")
    env: PPOEnvConfig = doc(PPOEnvConfig(), "Environment (the same section as the Dreamer recipe's).")
    model: PPOModelConfig = doc(PPOModelConfig(), "Actor and critic networks.")
    ppo: PPOLossConfig = doc(PPOLossConfig(), "PPO loss and optimiser.")
    train: PPOTrainConfig = doc(PPOTrainConfig(), "Training length and collection.")
    eval: PPOEvalConfig = doc(PPOEvalConfig(), "Evaluation.")
    run: PPORunConfig = doc(PPORunConfig(), "Run directory, logging and checkpoints.")


def validate(cfg: PPOConfig) -> None:
    check_ranges(cfg, {
        "env.num_envs": ">= 1", "env.max_episode_steps": ">= 0", "env.still_tol": ">= 0", "threads": ">= 0",
        "env.action_repeat": ">= 1",
        "model.hidden": ">= 1", "model.layers": ">= 1", "model.cnn_depth": ">= 1",
        "ppo.lr": "> 0", "ppo.gamma": "(0, 1]", "ppo.lmbda": "[0, 1]", "ppo.clip_epsilon": "> 0",
        "ppo.entropy_coef": ">= 0", "ppo.critic_coef": ">= 0", "ppo.epochs": ">= 1", "ppo.minibatch_size": ">= 1",
        "ppo.max_grad_norm": "> 0", "train.env_steps": ">= 1", "train.steps_per_env": ">= 1",
        "eval.every": ">= 0", "eval.episodes": ">= 1", "eval.confirm_episodes": ">= 0", "eval.recheck_episodes": ">= 0",
        "run.log_every": ">= 1", "run.checkpoint_every": ">= 1", "run.time_budget_s": ">= 0",
    })
    if cfg.env.reward_scale <= 0 or not math.isfinite(cfg.env.reward_scale):
        raise ConfigError(f"env.reward_scale must be a finite number > 0, got {cfg.env.reward_scale}")
    if cfg.env.mask_rule:
        raise ConfigError("env.mask_rule is a Dreamer setting (imagined masks); PPO reads the env's mask directly")
    if cfg.ppo.minibatch_size > cfg.env.num_envs * cfg.train.steps_per_env:
        raise ConfigError(f"ppo.minibatch_size ({cfg.ppo.minibatch_size}) is larger than one batch (env.num_envs x "
                          f"train.steps_per_env = {cfg.env.num_envs * cfg.train.steps_per_env})")
    if cfg.eval.stop_at_return is not None and not math.isfinite(cfg.eval.stop_at_return):
        raise ConfigError(f"eval.stop_at_return must be finite or null, got {cfg.eval.stop_at_return}")
    if cfg.env.pixels and cfg.env.obs_keys and cfg.env.obs_keys != ["pixels"]:
        raise ConfigError("env.pixels=true observes 'pixels' only; leave env.obs_keys empty")
    if not cfg.env.factory:
        from torchrl_dreamer.dreamer.envs import gym_env_ids

        if cfg.env.name not in gym_env_ids():
            raise ConfigError(f"unknown Gymnasium env id '{cfg.env.name}' (env.name)")
    check_device(cfg.device)


# --- env and networks --------------------------------------------------------------------------


def obs_keys(cfg: PPOConfig) -> list[str]:
    return list(cfg.env.obs_keys) or (["pixels"] if cfg.env.pixels else ["observation"])


def make_env_from_config(cfg: PPOConfig, *, num_envs: int, seed: int, check: bool = False) -> EnvBase:
    """The env exactly as the Dreamer recipe builds it (``check``: the env contract for PPO first)."""
    return make_dreamer_env(env_id=cfg.env.name, factory=cfg.env.factory, num_envs=num_envs, pixels=cfg.env.pixels,
                            seed=seed, max_episode_steps=cfg.env.max_episode_steps, kwargs=cfg.env.kwargs,
                            mask_key=cfg.env.mask_key, check_as="ppo" if check else "",
                            obs_keys=tuple(obs_keys(cfg)), still_tol=cfg.env.still_tol,
                            time_feature=cfg.env.time_feature, action_repeat=cfg.env.action_repeat)


class ObservationEncoder(nn.Module):
    """The observations (one tensor per key, in ``obs_keys`` order) -> one feature vector: vectors
    through ``symlog`` (scale-free inputs for any env), ``[3, 64, 64]`` uint8 pixels through a
    small CNN (Dreamer's :class:`~torchrl_dreamer.dreamer.nets.ConvEncoder`)."""

    def __init__(self, shapes: list[tuple[int, ...]], cnn_depth: int) -> None:
        super().__init__()
        from torchrl_dreamer.dreamer.nets import ConvEncoder

        self.convs = nn.ModuleList()
        self.out_features = 0
        for shape in shapes:
            if len(shape) == 3:
                conv = ConvEncoder(shape[0], cnn_depth, shape[-1])
                self.convs.append(conv)
                self.out_features += conv.out_features
            elif len(shape) == 1:
                self.convs.append(nn.Identity())
                self.out_features += shape[0]
            else:
                raise ConfigError(f"PPO takes vector [F] or [3, 64, 64] pixel observations, got shape {list(shape)}")

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        from torchrl_dreamer.dreamer.functional import symlog

        parts = [conv(x) if not isinstance(conv, nn.Identity) else symlog(x.float()) for conv, x in zip(self.convs, obs)]
        return torch.cat(parts, -1)


def _mlp(in_features: int, out_features: int, cfg: PPOModelConfig, out_gain: float) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}[Activation(cfg.activation).value]
    layers, size = [], in_features
    for _ in range(cfg.layers):
        linear = nn.Linear(size, cfg.hidden)
        nn.init.orthogonal_(linear.weight, math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers += [linear, act()]
        size = cfg.hidden
    head = nn.Linear(size, out_features)
    nn.init.orthogonal_(head.weight, out_gain)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


class Tower(nn.Module):
    """Observations -> :class:`ObservationEncoder` -> MLP (one for the actor, one for the critic)."""

    def __init__(self, shapes: list[tuple[int, ...]], out_features: int, cfg: PPOModelConfig, out_gain: float) -> None:
        super().__init__()
        self.encoder = ObservationEncoder(shapes, cfg.cnn_depth)
        self.head = _mlp(self.encoder.out_features, out_features, cfg, out_gain)

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(*obs))


class PPONetworks(nn.Module):
    """The actor and critic towers (no shared parameters, so ``ClipPPOLoss`` trains each with its
    own loss term), kept together for checkpoints and ``.to(device)``."""

    def __init__(self, shapes: list[tuple[int, ...]], action_dim: int, continuous: bool, cfg: PPOModelConfig) -> None:
        super().__init__()
        self.actor = Tower(shapes, 2 * action_dim if continuous else action_dim, cfg, 0.01)
        self.critic = Tower(shapes, 1, cfg, 1.0)


def build_agent(cfg: PPOConfig, env: EnvBase):
    """``(networks, actor, critic, mask_key)``: TorchRL's ``ProbabilisticActor`` and ``ValueOperator``
    around :class:`PPONetworks`."""
    from torchrl.data import Bounded, OneHot
    from torchrl.modules import (MaskedOneHotCategorical, OneHotCategorical, ProbabilisticActor, TanhNormal,
                                 ValueOperator)

    keys = obs_keys(cfg)
    spec = env.observation_spec
    shapes = []
    for key in keys:
        if key not in spec.keys():
            raise ConfigError(f"observation key '{key}' not in the env's observation spec: {list(spec.keys())}")
        shapes.append(tuple(spec[key].shape[len(env.batch_size):]))
    action = env.action_spec_unbatched
    mask_key = cfg.env.mask_key if cfg.env.mask_key and cfg.env.mask_key in spec.keys() else None
    if isinstance(action, OneHot):
        continuous, action_dim = False, action.shape[-1]
    elif isinstance(action, Bounded):
        continuous, action_dim = True, action.shape[-1]
        if mask_key:
            raise ConfigError(f"the env observes '{mask_key}' but its actions are continuous; set env.mask_key=''")
    else:
        raise ConfigError("the PPO recipe needs a Categorical or OneHot (discrete) or Bounded (continuous) action "
                          f"spec; got {type(action).__name__}")
    nets = PPONetworks(shapes, action_dim, continuous, cfg.model).to(cfg.device)
    if continuous:
        module = TensorDictModule(nn.Sequential(nets.actor, NormalParamExtractor()), in_keys=keys,
                                  out_keys=["loc", "scale"])
        actor = ProbabilisticActor(module, in_keys=["loc", "scale"], spec=env.full_action_spec_unbatched,
                                   distribution_class=TanhNormal,
                                   distribution_kwargs={"low": action.space.low.to(cfg.device),
                                                        "high": action.space.high.to(cfg.device)},
                                   return_log_prob=True)
    else:
        module = TensorDictModule(nets.actor, in_keys=keys, out_keys=["logits"])
        dist_keys = {"logits": "logits", "mask": mask_key} if mask_key else ["logits"]
        actor = ProbabilisticActor(module, in_keys=dist_keys, spec=env.full_action_spec_unbatched,
                                   distribution_class=MaskedOneHotCategorical if mask_key else OneHotCategorical,
                                   return_log_prob=True)
    critic = ValueOperator(nets.critic, in_keys=keys)
    return nets, actor, critic, mask_key


def build_loss(cfg: PPOConfig, actor, critic):
    """TorchRL's ``ClipPPOLoss`` and ``GAE`` with this config's coefficients."""
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    c = cfg.ppo
    loss = ClipPPOLoss(actor, critic, clip_epsilon=c.clip_epsilon, entropy_coeff=c.entropy_coef,
                       critic_coeff=c.critic_coef, loss_critic_type="smooth_l1",
                       normalize_advantage=c.normalize_advantage)
    gae = GAE(gamma=c.gamma, lmbda=c.lmbda, value_network=critic, average_gae=False)
    return loss, gae


def preflight(cfg: PPOConfig, resume_state: Optional[dict]) -> None:
    env = make_env_from_config(cfg, num_envs=cfg.env.num_envs, seed=cfg.seed, check=True)
    try:
        nets, *_ = build_agent(cfg, env)
        if resume_state is not None:
            load_weights(nets, resume_state["networks"], "checkpoint")
    finally:
        env.close(raise_if_closed=False)


# --- training ----------------------------------------------------------------------------------


@dataclass
class PPOProgress:
    env_steps: int = 0
    iterations: int = 0
    next_eval: int = 0
    next_ckpt: int = 0
    next_log: int = 0
    best_return: float = -math.inf


POSTFIX = {"train/episode_reward_sum": "R", "eval/episode_reward_sum": "R_eval", "time/env_steps_per_s": "steps/s"}
CURVES = (
    ("episode reward sum", ("train/episode_reward_sum", "eval/episode_reward_sum")),
    ("losses", ("loss/objective", "loss/critic", "loss/entropy")),
    ("diagnostics", ("diag/entropy", "diag/clip_fraction", "diag/kl_approx")),
    ("speed", ("time/env_steps_per_s",)),
)


def ppo_update(cfg: PPOConfig, loss_module, gae, optimizer, params, batch, iteration: int, run_dir: str,
               lr: float) -> dict[str, float]:
    """GAE on the batch, then ``ppo.epochs`` passes of shuffled minibatches; returns the means.
    A non-finite loss stops before its optimizer step (parameters untouched)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.no_grad():
        gae(batch)
    flat = batch.reshape(-1)
    n, mb = flat.shape[0], cfg.ppo.minibatch_size
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for _ in range(cfg.ppo.epochs):
        perm = torch.randperm(n, device=flat.device)
        for start in range(0, n - mb + 1, mb):
            out = loss_module(flat[perm[start:start + mb]])
            total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
            if not bool(torch.isfinite(total)):
                raise NonFiniteError("loss/total", iteration=iteration, run_dir=run_dir,
                                     detail=" (PPO loss; optimizer step not taken)")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.ppo.max_grad_norm)
            optimizer.step()
            for key, name in (("loss_objective", "loss/objective"), ("loss_critic", "loss/critic"),
                              ("loss_entropy", "loss/entropy"), ("entropy", "diag/entropy"),
                              ("clip_fraction", "diag/clip_fraction"), ("kl_approx", "diag/kl_approx")):
                if key in out.keys():
                    sums[name] = sums.get(name, 0.0) + out[key].detach().float().mean()
            sums["diag/grad_norm"] = sums.get("diag/grad_norm", 0.0) + grad_norm.detach()
            count += 1
    check_parameters_finite(params, iteration=iteration, run_dir=run_dir)
    return {k: float(v) / max(count, 1) for k, v in sums.items()}


def train(cfg: PPOConfig, run_dir: Path, resume_state: Optional[dict] = None,
          on_eval: Optional[Callable[[dict[str, float]], None]] = None) -> dict[str, float]:
    """Trains until ``train.env_steps`` (or the time budget, or ``eval.stop_at_return``); returns the
    last logged metrics."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    env = make_env_from_config(cfg, num_envs=cfg.env.num_envs, seed=cfg.seed)
    nets, actor, critic, mask_key = build_agent(cfg, env)
    loss_module, gae = build_loss(cfg, actor, critic)
    params = list(nets.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.ppo.lr, eps=1e-5)
    frames = cfg.env.num_envs * cfg.train.steps_per_env
    p = PPOProgress(next_eval=cfg.eval.every, next_ckpt=cfg.run.checkpoint_every, next_log=cfg.run.log_every)
    if resume_state is not None:
        load_weights(nets, resume_state["networks"], "checkpoint")
        optimizer.load_state_dict(resume_state["optimizer"])
        p = PPOProgress(**{k: resume_state[k] for k in ("env_steps", "iterations", "next_eval", "next_ckpt",
                                                        "next_log", "best_return")})
        set_rng_state(resume_state["rng"])
    eval_env = make_env_from_config(cfg, num_envs=cfg.eval.episodes, seed=cfg.seed + 10_000)
    collector = Collector(env, actor, frames_per_batch=frames, total_frames=-1, env_device="cpu",
                          policy_device=cfg.device, storing_device=cfg.device,
                          auto_register_policy_transforms=False)  # InitTracker is already in the env
    collector.set_seed(cfg.seed + p.env_steps)
    run = TrainingRun(run_dir, run_cfg=cfg.run, total=cfg.train.env_steps, initial=p.env_steps, unit="step",
                      resume_state=resume_state, resume_step=p.env_steps, postfix=POSTFIX, curves=CURVES,
                      x_label="env steps (all envs together)")
    keys = obs_keys(cfg)
    finite_keys = [*keys, *(("next", k) for k in keys), ("next", "reward")]
    episode_sums: list[float] = []
    window_steps, t_window, metrics = 0, time.perf_counter(), {}
    try:
        for batch in collector:
            check_tensordict_finite(batch, finite_keys, iteration=p.iterations, run_dir=run.rd)
            if cfg.env.reward_scale != 1.0:
                batch.set(("next", "reward"), batch.get(("next", "reward")) * cfg.env.reward_scale)
            done = batch.get(("next", "done")).reshape(-1)
            if bool(done.any()):
                episode_sums += batch.get(("next", "episode_reward")).reshape(-1)[done].tolist()
            lr = cfg.ppo.lr * (1.0 - p.env_steps / cfg.train.env_steps if cfg.ppo.anneal_lr else 1.0)
            losses = ppo_update(cfg, loss_module, gae, optimizer, params, batch, p.iterations, run.rd, max(lr, 0.0))
            p.env_steps += batch.numel()
            p.iterations += 1
            window_steps += batch.numel()
            out_of_time = run.out_of_time()
            finished, stop_reason, evaluation = p.env_steps >= cfg.train.env_steps or out_of_time, "", None
            if (cfg.eval.every and p.env_steps >= p.next_eval) or finished:
                p.next_eval += cfg.eval.every or cfg.train.env_steps
                sampled = cfg.eval.actions == EvalActions.sample  # own seeded generators, as in the Dreamer recipe
                evaluation = run.evaluated(run_episodes(actor, eval_env, actions=cfg.eval.actions,
                                                        seed=cfg.seed + 10_000 + p.iterations if sampled else None),
                                           ("eval/episode_reward_sum", "eval/episode_length"), iteration=p.iterations)
                score = evaluation["eval/episode_reward_sum"]
                if cfg.eval.keep_best and cfg.eval.recheck_episodes and math.isfinite(score) and score > p.best_return:
                    pooled = recheck(evaluation, lambda i: run_episodes(
                        actor, eval_env, actions=cfg.eval.actions,
                        seed=cfg.seed + 50_000 + p.iterations + i if sampled else None),
                        episodes=cfg.eval.recheck_episodes, per_round=cfg.eval.episodes)
                    evaluation.update(run.evaluated(pooled, iteration=p.iterations))
                    score = evaluation["eval/recheck_episode_reward_sum"]
                if cfg.eval.keep_best and math.isfinite(score) and score > p.best_return:
                    p.best_return = score
                    run.save({"networks": nets.state_dict(), "env_steps": p.env_steps, "iterations": p.iterations,
                              "eval/episode_reward_sum": score,
                              "eval/episodes": evaluation.get("eval/recheck_episodes", evaluation.get("eval/episodes"))},
                             name=BEST_NAME)
                if cfg.eval.keep_best and math.isfinite(p.best_return):
                    evaluation["eval/best_episode_reward_sum"] = p.best_return
                stop_at = cfg.eval.stop_at_return
                score = evaluation["eval/episode_reward_sum"]  # the eval.episodes score, as in the Dreamer recipe
                if stop_at is not None and score >= stop_at:
                    stop_reason, finished = f"eval return {score:.1f} >= {stop_at}", True
            if p.env_steps >= p.next_log or evaluation is not None or finished:
                p.next_log = p.env_steps + cfg.run.log_every
                now = time.perf_counter()
                metrics = {**losses, **(evaluation or {}),
                           "train/episode_reward_sum": sum(episode_sums) / len(episode_sums) if episode_sums
                           else math.nan,
                           "train/episodes_finished": len(episode_sums), "train/env_steps": p.env_steps,
                           "train/iterations": p.iterations, "diag/lr": lr,
                           "time/env_steps_per_s": window_steps / max(now - t_window, 1e-9),
                           "time/total_s": run.elapsed()}
                run.log(metrics, step=p.env_steps)
                episode_sums, window_steps, t_window = [], 0, now
            if evaluation is not None and on_eval is not None:
                on_eval(dict(metrics))
            if p.env_steps >= p.next_ckpt or finished:
                p.next_ckpt += cfg.run.checkpoint_every
                run.save({"networks": nets.state_dict(), "optimizer": optimizer.state_dict(),
                          **{k: getattr(p, k) for k in ("env_steps", "iterations", "next_eval", "next_ckpt",
                                                         "next_log", "best_return")}, "rng": rng_state()})
            run.logger.advance(batch.numel())
            if finished:
                stop_reason = f"time budget of {cfg.run.time_budget_s:.0f} s reached" if out_of_time else stop_reason
                if stop_reason:
                    run.logger.write(f"stopping at {p.env_steps} env steps: {stop_reason}")
                break
    finally:
        run.close()
        collector.shutdown()
        for e in (env, eval_env):
            e.close(raise_if_closed=False)
    if cfg.eval.confirm_episodes and run.is_main:  # reached only when training ended without an error
        confirm_policies(cfg, run.rd, nets, actor, p)
    return metrics


def confirm_policies(cfg: PPOConfig, run_dir: str | Path, nets: nn.Module, actor, p: PPOProgress) -> dict:
    """Scores the final weights and ``best.pt`` on ``eval.confirm_episodes`` fresh episodes each (the
    same seeds for both, none used in training or in the periodic evaluations; ``eval.actions``) and
    writes ``<run>/result.json`` naming the better file, as the Dreamer recipe does."""
    run_dir, n, seed = Path(run_dir), cfg.eval.confirm_episodes, cfg.seed + 30_000
    return confirm_final_and_best(
        run_dir, episodes=n, seed=seed, networks=nets, final_env_steps=p.env_steps,
        make_env=lambda: make_env_from_config(cfg, num_envs=n, seed=seed),
        evaluate=lambda env: run_episodes(actor, env, actions=cfg.eval.actions),
        best_file=run_dir / BEST_NAME if cfg.eval.keep_best else None,
        load_best=lambda state: load_weights(nets, state["networks"], BEST_NAME), checkpoint_name=CHECKPOINT_NAME,
        device=cfg.device)


def evaluate_checkpoint(cfg: PPOConfig, run_dir: Path) -> dict[str, float]:
    """Loads ``run_dir``'s checkpoint (or a checkpoint file such as ``<run>/best.pt``) and runs
    ``eval.episodes`` episodes (``eval.actions``); prints the JSON line and writes ``eval.json``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    state = load_checkpoint(run_dir, map_location=cfg.device)
    torch.manual_seed(cfg.seed + 20_000)
    env = make_env_from_config(cfg, num_envs=cfg.eval.episodes, seed=cfg.seed + 20_000)
    nets, actor, _, _ = build_agent(cfg, env)
    load_weights(nets, state["networks"], "checkpoint")
    t0 = time.perf_counter()
    metrics = run_episodes(actor, env, actions=cfg.eval.actions)
    metrics["time/eval_s"] = time.perf_counter() - t0
    env.close()
    run_dir, checkpoint, suffix = evaluation_paths(run_dir)
    report_evaluation({"run_dir": str(run_dir), "checkpoint": str(checkpoint), "env_steps": state["env_steps"],
                       "iterations": state["iterations"], "seed": cfg.seed, **metrics}, run_dir, f"eval{suffix}.json")
    return metrics


RECIPE_SPEC = Recipe(
    name=RECIPE, schema=PPOConfig, config_dir=CONFIG_DIR, default_env="cartpole", description=__doc__,
    validate=validate, preflight=preflight, train=train, evaluate=evaluate_checkpoint,
    run_name=lambda cfg: (cfg.env.factory.replace(":", ".") if cfg.env.factory
                          else cfg.env.name + ("-pixels" if cfg.env.pixels else "")),
    progress=("env_steps", "train.env_steps", "env steps"), log_step="env_steps",
    required=("networks", "env_steps", "iterations"), factory_env="custom",
    algo="ppo", algos={"dreamer": "recipes.dreamer:main"},
)


main, cli = entry_points(RECIPE_SPEC)


if __name__ == "__main__":
    cli()
