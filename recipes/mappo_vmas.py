"""Multi-agent PPO (MAPPO / IPPO) on VMAS scenarios or any TorchRL multi-agent env.

    python -m recipes.mappo_vmas --env navigation                 # MAPPO, seed settings
    python -m recipes.mappo_vmas --env wheel model.centralised_critic=false   # IPPO
    python -m recipes.mappo_vmas --resume runs/mappo_vmas/navigation/<stamp> collector.iterations=20
    python -m recipes.mappo_vmas --evaluate runs/mappo_vmas/navigation/<stamp> eval.num_envs=100

Layers: ``configs/mappo_vmas/base.yaml`` <- ``configs/mappo_vmas/<env>.yaml`` <- CLI overrides.
Each iteration: collect ``frames_per_batch`` frames with TorchRL's ``Collector`` -> GAE ->
``ppo.epochs`` passes of minibatch PPO -> log -> (eval, checkpoint).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreamer.checkpoint import (
    CheckpointError, load_checkpoint, rng_state, set_rng_state,
)
from torchrl_dreamer.config import Choice, ConfigError, check_ranges, doc
from torchrl_dreamer.distributed import SINGLE, DataParallel, data_parallel
from torchrl_dreamer.distributed import rank_config as shard_config
from torchrl_dreamer.envs import episode_reward_transform, make_env
from torchrl_dreamer.guards import check_tensordict_finite
from baselines.mappo_networks import AgentGroupMLP, TanhNormalHead
from torchrl_dreamer.evaluation import evaluation_paths, report_evaluation
from torchrl_dreamer.runtime import check_device
from torchrl_dreamer.trainer import EvalConfig, Recipe, RunConfig, TrainingRun, entry_points
from baselines.mappo import (
    MultiAgentPPOLoss,
    TanhNormalPolicy,
    make_torchrl_clip_ppo_loss,
    ppo_update,
    torchrl_ppo_update,
)
from torchrl_dreamer.transforms import reward_keys

CONFIG_DIR = Path(__file__).parent / "configs" / "mappo_vmas"
RECIPE = "mappo_vmas"


# --- config -----------------------------------------------------------------------------------


class Activation(Choice):
    """Hidden-layer activation (the keys of ``baselines.mappo_networks.ACTIVATIONS``)."""
    tanh = "tanh"
    relu = "relu"
    silu = "silu"
    elu = "elu"


class PPOImpl(Choice):
    fused = "fused"
    torchrl = "torchrl"


class CriticLoss(Choice):
    smooth_l1 = "smooth_l1"
    l2 = "l2"


@dataclass
class EnvConfig:
    scenario: str = doc("navigation", "VMAS scenario name (ignored when env.factory is set; the tuned ones have an "
                                      "--env YAML, see docs/multi_agent.md).")
    factory: str = doc("", "Custom env 'package.module:function' returning a TorchRL EnvBase (docs/custom_envs.md).")
    kwargs: Dict[str, Any] = doc({}, "Keyword arguments for the VMAS scenario or the factory (e.g. n_agents).")
    max_steps: int = doc(100, "Episode horizon; envs in parallel = frames_per_batch // max_steps.")


@dataclass
class ModelConfig:
    width: int = doc(256, "Hidden units per layer (policy and critic), as in TorchRL's MAPPO tutorial.")
    depth: int = doc(2, "Hidden layers (policy and critic).")
    activation: Activation = doc(Activation.tanh, "Hidden-layer activation (policy and critic).")
    share_policy_params: bool = doc(True, "One policy network for all agents (homogeneous agents).")
    share_critic_params: bool = doc(True, "One critic network for all agents.")
    centralised_critic: bool = doc(True, "Critic sees all agents' observations: MAPPO (true) or IPPO (false).")
    init_scale: float = doc(1.0, "Policy Gaussian std (before tanh) of an untrained network; 1.0 is TorchRL's "
                                 "biased_softplus_1.0. Smaller starts with gentler exploration.")


@dataclass
class PPOConfig:
    impl: PPOImpl = doc(PPOImpl.fused, "'fused' (plain-tensor minibatch loop) or 'torchrl' (ClipPPOLoss + ReplayBuffer).")
    epochs: int = doc(30, "Passes over each collected batch.")
    minibatch_size: int = doc(400, "Env steps per minibatch (each holds every agent of that step).")
    lr: float = doc(3e-4, "Adam learning rate.")
    max_grad_norm: float = doc(1.0, "Global gradient-norm clip.")
    clip_epsilon: float = doc(0.2, "PPO ratio clip.")
    gamma: float = doc(0.99, "Discount.")
    lmbda: float = doc(0.9, "GAE lambda.")
    entropy_coef: float = doc(1e-4, "Entropy bonus weight.")
    critic_coef: float = doc(1.0, "Critic loss weight.")
    critic_loss: CriticLoss = doc(CriticLoss.smooth_l1, "Critic loss: smooth_l1 or l2.")
    normalize_advantage: bool = doc(False, "Standardise advantages per minibatch.")
    compile: bool = doc(True, "torch.compile the fused loss (faster with 2+ threads; ~12 s warm-up).")


@dataclass
class CollectorConfig:
    frames_per_batch: int = doc(6000, "Env frames (steps x parallel envs) collected per iteration.")
    iterations: int = doc(10, "Training iterations (collect + update).")


@dataclass
class MAPPOEvalConfig(EvalConfig):
    every: int = doc(5, "Evaluate every N iterations (0 = never); also after the last one.")
    num_envs: int = doc(32, "Parallel evaluation episodes (deterministic actions, one full horizon).")


@dataclass
class MAPPOConfig:
    """Every default of the recipe (PPO settings: TorchRL's MAPPO tutorial, as on navigation);
    ``configs/mappo_vmas/<env>.yaml`` sets only what differs for that scenario."""
    seed: int = doc(0, "Seed for torch, numpy, python and the envs.")
    device: str = doc("cpu", "Device for envs, networks and training (cpu, cuda, cuda:1, ...).")
    threads: int = doc(0, "torch intra-op threads (0 = torch's default, all cores).")
    env: EnvConfig = doc(EnvConfig(), "Environment.")
    model: ModelConfig = doc(ModelConfig(), "Networks.")
    ppo: PPOConfig = doc(PPOConfig(), "PPO loss and optimisation.")
    collector: CollectorConfig = doc(CollectorConfig(), "Data collection.")
    eval: MAPPOEvalConfig = doc(MAPPOEvalConfig(), "Evaluation.")
    run: RunConfig = doc(RunConfig(checkpoint_every=5), "Run directory, logging and checkpoints.")


# --- factories ---------------------------------------------------------------------------------


def agent_group(env: EnvBase) -> str:
    """The single agent group of ``env`` (the prefix of its reward key)."""
    groups = sorted({k[:-1] for k in reward_keys(env)})
    if len(groups) != 1 or len(groups[0]) != 1:
        raise ConfigError(
            f"the MAPPO recipe needs exactly one agent group with a ('<group>', 'reward') key; "
            f"the env has reward keys {env.reward_keys}"
        )
    return groups[0][0]


def make_env_from_config(cfg: MAPPOConfig, *, num_envs: int, seed: int) -> EnvBase:
    return make_env(
        scenario=cfg.env.scenario,
        factory=cfg.env.factory,
        kwargs=cfg.env.kwargs,
        num_envs=num_envs,
        max_steps=cfg.env.max_steps,
        device=cfg.device,
        seed=seed,
    )


def make_agent(env: EnvBase, cfg: ModelConfig, device: str) -> tuple[TensorDictModule, TanhNormalPolicy, AgentGroupMLP]:
    """Policy (acting module + plain policy) and critic for the env's agent group."""
    group = agent_group(env)
    obs_spec = env.observation_spec[group, "observation"]
    action_spec = env.full_action_spec_unbatched[group, "action"]
    n_agents, obs_dim = obs_spec.shape[-2], obs_spec.shape[-1]
    action_dim = action_spec.shape[-1]
    backbone = AgentGroupMLP(
        obs_dim, 2 * action_dim, n_agents, centralised=False, share_params=cfg.share_policy_params,
        width=cfg.width, depth=cfg.depth, activation=cfg.activation,
    )
    low, high = action_spec.space.low, action_spec.space.high
    policy = TanhNormalPolicy(backbone, TanhNormalHead(low, high, init_scale=cfg.init_scale)).to(device)
    critic = AgentGroupMLP(
        obs_dim, 1, n_agents, centralised=cfg.centralised_critic, share_params=cfg.share_critic_params,
        width=cfg.width, depth=cfg.depth, activation=cfg.activation,
    ).to(device)
    policy_module = TensorDictModule(
        policy,
        in_keys=[(group, "observation")],
        out_keys=[(group, "action"), (group, "action_pretanh"), (group, "action_log_prob")],
    )
    return policy_module, policy, critic


def make_loss(policy: TanhNormalPolicy, critic: AgentGroupMLP, cfg: PPOConfig, group: str):
    common = dict(
        clip_epsilon=cfg.clip_epsilon, entropy_coef=cfg.entropy_coef, critic_coef=cfg.critic_coef,
        critic_loss=cfg.critic_loss, normalize_advantage=cfg.normalize_advantage,
    )
    fused = MultiAgentPPOLoss(policy, critic, **common)
    fused.set_keys(
        observation=(group, "observation"), action_pretanh=(group, "action_pretanh"),
        sample_log_prob=(group, "action_log_prob"), advantage=(group, "advantage"),
        value_target=(group, "value_target"), value=(group, "state_value"),
        reward=(group, "reward"), done=(group, "done"), terminated=(group, "terminated"),
    )
    fused.make_value_estimator(gamma=cfg.gamma, lmbda=cfg.lmbda)
    if cfg.impl == "fused":
        if cfg.compile:
            fused.enable_compile()
        return fused, fused
    if cfg.impl == "torchrl":
        return fused, make_torchrl_clip_ppo_loss(policy, critic, group=group, **common)
    raise ConfigError(f"ppo.impl must be 'fused' or 'torchrl', got '{cfg.impl}'")


def update(loss, batch, optimizer, cfg: PPOConfig, *, iteration: int, run_dir: str,
           dp: DataParallel = SINGLE) -> dict[str, float]:
    """One iteration's PPO epochs on a collected batch (advantages already in it; ``dp``: gradients
    averaged over the data-parallel ranks)."""
    kwargs = dict(
        epochs=cfg.epochs, minibatch_size=cfg.minibatch_size, max_grad_norm=cfg.max_grad_norm,
        iteration=iteration, run_dir=run_dir,
    )
    if isinstance(loss, MultiAgentPPOLoss):
        return ppo_update(loss, batch, optimizer, dp=dp, **kwargs)
    return torchrl_ppo_update(loss, batch, optimizer, **kwargs)


@torch.no_grad()
def evaluate(policy_module: TensorDictModule, env: EnvBase, max_steps: int) -> dict[str, float]:
    """One full-horizon rollout of every eval env with deterministic (mode) actions."""
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(max_steps, policy_module, break_when_any_done=False)
    return episode_reward_transform(env).summarise(rollout, prefix="eval")


# --- main --------------------------------------------------------------------------------------


def train(
    cfg: MAPPOConfig,
    run_dir: Path,
    resume_state: Optional[dict] = None,
    on_iteration: Optional[Callable[[dict[str, float]], None]] = None,
) -> dict[str, float]:
    """Trains until ``cfg.collector.iterations``; returns the last logged metrics.

    ``on_iteration(metrics)`` is called after each iteration's metrics are logged (benchmarks; its
    time does not count as training).
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dp = data_parallel(cfg.device)  # torchrun: this rank collects its share of the batch (see rank_config)
    cfg = rank_config(cfg, dp)
    torch.manual_seed(cfg.seed)
    frames_per_batch, max_steps = cfg.collector.frames_per_batch, cfg.env.max_steps
    rank_seed = cfg.seed + 1_000_003 * dp.rank  # each rank's own VMAS envs
    env = make_env_from_config(cfg, num_envs=frames_per_batch // max_steps, seed=rank_seed)
    group = agent_group(env)
    policy_module, policy, critic = make_agent(env, cfg.model, cfg.device)
    fused_loss, loss = make_loss(policy, critic, cfg.ppo, group)
    optimizer = make_optimizer(cfg, policy, critic)
    start_iteration, frames = restore(resume_state, policy, critic, optimizer)
    if dp.enabled:
        dp.broadcast_module(policy, critic)  # every rank starts from rank 0's weights
        if dp.rank:
            torch.manual_seed(rank_seed + start_iteration)  # own minibatch order and action noise
    evaluating = cfg.eval.every and dp.is_main  # rank 0 evaluates
    eval_env = make_env_from_config(cfg, num_envs=cfg.eval.num_envs, seed=cfg.seed + 10_000) if evaluating else None
    reward_sum = episode_reward_transform(env)
    collector = Collector(
        env, policy_module, frames_per_batch=frames_per_batch,
        total_frames=frames_per_batch * (cfg.collector.iterations - start_iteration), device=cfg.device,
        storing_device=cfg.device, auto_register_policy_transforms=False,  # the policy is stateless: no InitTracker
    )
    collector.set_seed(rank_seed + start_iteration)
    finite_keys = [(group, "observation"), (group, "action"), ("next", group, "observation"), ("next", group, "reward")]
    metrics: dict[str, float] = {}
    # logged step = frames = batch.numel(): env steps summed over the vectorised envs (one env step moves every agent)
    run = TrainingRun(run_dir, run_cfg=cfg.run, total=cfg.collector.iterations, initial=start_iteration, unit="iter",
                      resume_state=resume_state, resume_step=frames, postfix=POSTFIX,
                      x_label="env steps (all vectorised envs, not per agent)", dp=dp)
    try:
        t_last = time.perf_counter()
        for iteration, batch in enumerate(collector, start=start_iteration + 1):
            t_collected = time.perf_counter()
            check_tensordict_finite(batch, finite_keys, iteration=iteration, run_dir=run.rd)
            fused_loss.compute_advantage(batch)
            check_tensordict_finite(batch, [(group, "advantage"), (group, "value_target")], iteration=iteration,
                                    run_dir=run.rd)
            t_advantage = time.perf_counter()
            metrics = update(loss, batch, optimizer, cfg.ppo, iteration=iteration, run_dir=run.rd, dp=dp)
            collector.update_policy_weights_()
            t_updated = time.perf_counter()
            frames += batch.numel() * dp.world_size  # every rank collected as much
            metrics.update(reward_sum.summarise(batch))
            metrics.update(batch_metrics(batch, group, iteration, frames, t_last, t_collected, t_advantage, t_updated))
            out_of_time = run.out_of_time()  # read once: the last iteration still evaluates and checkpoints
            last = iteration == cfg.collector.iterations or out_of_time
            if eval_env is not None and run.due(iteration, cfg.eval.every, last):
                metrics.update(run.evaluated(evaluate(policy_module, eval_env, max_steps), ("eval/episode_reward_sum",),
                                             iteration=iteration))
            metrics.update({"time/iteration_s": time.perf_counter() - t_last, "time/total_s": run.elapsed()})
            run.log(metrics, step=frames)  # log, then checkpoint (see TrainingRun)
            if run.due(iteration, cfg.run.checkpoint_every, last):
                run.save({"policy": policy.state_dict(), "critic": critic.state_dict(),
                          "optimizer": optimizer.state_dict(), "iteration": iteration, "frames": frames,
                          "rng": rng_state()})
            run.logger.advance()
            if on_iteration is not None:
                with run.not_counted():
                    on_iteration(dict(metrics))
            t_last = time.perf_counter()  # the next collection starts here
            if out_of_time:
                run.budget_reached(iteration)
                break
    finally:
        run.close()
        collector.shutdown()
        env.close()
        if eval_env is not None:
            eval_env.close()
    return metrics


POSTFIX = {"train/episode_reward_sum": "R", "eval/episode_reward_sum": "R_eval", "loss/objective": "obj",
           "loss/critic": "critic", "time/iteration_s": "s/it"}


def make_optimizer(cfg: MAPPOConfig, policy: torch.nn.Module, critic: torch.nn.Module) -> torch.optim.Adam:
    """Adam over policy and critic; fused (one kernel for all parameters, ~1.5 ms less per minibatch
    step on this CPU) where torch has it."""
    fused = torch.device(cfg.device).type in ("cpu", "cuda")
    return torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=cfg.ppo.lr, fused=fused)


def restore(resume_state: Optional[dict], policy, critic, optimizer) -> tuple[int, int]:
    """Loads a checkpoint (networks, Adam, RNG states); returns ``(iteration, frames)``, zeros for a new run."""
    if resume_state is None:
        return 0, 0
    load_weights(policy, resume_state["policy"], "policy")
    load_weights(critic, resume_state["critic"], "critic")
    optimizer.load_state_dict(resume_state["optimizer"])
    set_rng_state(resume_state["rng"])
    return resume_state["iteration"], resume_state["frames"]


def batch_metrics(batch, group: str, iteration: int, frames: int, t_last: float, t_collected: float,
                  t_advantage: float, t_updated: float) -> dict[str, float]:
    return {
        "train/iteration": iteration,
        "train/frames": frames,
        "diag/value_target_mean": batch.get((group, "value_target")).mean().item(),
        "diag/advantage_std": batch.get((group, "advantage")).std().item(),
        "time/collect_s": t_collected - t_last,
        "time/advantage_s": t_advantage - t_collected,
        "time/update_s": t_updated - t_advantage,
        "time/collect_frames_per_s": batch.numel() / max(t_collected - t_last, 1e-9),
    }


def evaluate_checkpoint(cfg: MAPPOConfig, run_dir: Path) -> dict[str, float]:
    """Loads ``run_dir``'s checkpoint and evaluates it: ``eval.num_envs`` full-horizon episodes,
    deterministic actions. Returns the ``eval/*`` metrics; prints them as a JSON line and writes
    that to ``<run dir>/eval.json`` (a read-only run directory only costs the file: a note on stderr)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    state = load_checkpoint(run_dir, map_location=cfg.device)
    env = make_env_from_config(cfg, num_envs=cfg.eval.num_envs, seed=cfg.seed + 20_000)
    policy_module, policy, _ = make_agent(env, cfg.model, cfg.device)
    load_weights(policy, state["policy"], "policy")
    t0 = time.perf_counter()
    metrics = evaluate(policy_module, env, cfg.env.max_steps)
    metrics["time/eval_s"] = time.perf_counter() - t0
    env.close()
    run_dir, checkpoint, suffix = evaluation_paths(run_dir)
    report_evaluation({"run_dir": str(run_dir), "checkpoint": str(checkpoint), "iteration": state["iteration"],
                       "frames": state["frames"], "seed": cfg.seed, **metrics}, run_dir, f"eval{suffix}.json")
    return metrics


def validate(cfg: MAPPOConfig) -> None:
    """Checks values the type system cannot, before any run directory or env is created."""
    from torchrl_dreamer.envs import vmas_scenarios

    if not cfg.env.factory and cfg.env.scenario not in vmas_scenarios():
        raise ConfigError(f"unknown VMAS scenario '{cfg.env.scenario}'. Available: {', '.join(sorted(vmas_scenarios()))}")
    check_ranges(cfg, {
        "threads": ">= 0", "env.max_steps": ">= 1", "model.width": ">= 1", "model.depth": ">= 0", "model.init_scale": "> 0",
        "ppo.epochs": ">= 1", "ppo.minibatch_size": ">= 1", "ppo.lr": "> 0", "ppo.max_grad_norm": "> 0",
        "ppo.clip_epsilon": "> 0", "ppo.gamma": "(0, 1]", "ppo.lmbda": "[0, 1]", "ppo.entropy_coef": ">= 0",
        "ppo.critic_coef": ">= 0", "collector.frames_per_batch": ">= 1", "collector.iterations": ">= 1",
        "eval.every": ">= 0", "eval.num_envs": ">= 0", "run.checkpoint_every": ">= 1", "run.time_budget_s": ">= 0",
    })
    if cfg.collector.frames_per_batch % cfg.env.max_steps:
        raise ConfigError(f"collector.frames_per_batch ({cfg.collector.frames_per_batch}) must be a multiple of "
                          f"env.max_steps ({cfg.env.max_steps})")
    if cfg.ppo.minibatch_size > cfg.collector.frames_per_batch:
        raise ConfigError(f"ppo.minibatch_size ({cfg.ppo.minibatch_size}) exceeds collector.frames_per_batch "
                          f"({cfg.collector.frames_per_batch})")
    if cfg.eval.every < 0 or (cfg.eval.every and cfg.eval.num_envs <= 0):
        raise ConfigError("eval.every must be >= 0 and eval.num_envs > 0 when evaluating")
    check_device(cfg.device)
    dp = data_parallel(cfg.device)
    if dp.enabled:
        if cfg.ppo.impl != "fused":
            raise ConfigError("data-parallel MAPPO (torchrun) needs ppo.impl=fused")
        local = rank_config(cfg, dp)
        if local.collector.frames_per_batch % cfg.env.max_steps:
            raise ConfigError(f"collector.frames_per_batch={cfg.collector.frames_per_batch} split over "
                              f"{dp.world_size} ranks gives {local.collector.frames_per_batch} per rank, not a "
                              f"multiple of env.max_steps ({cfg.env.max_steps})")


def rank_config(cfg: MAPPOConfig, dp: DataParallel) -> MAPPOConfig:
    """This rank's config under ``torchrun``: ``collector.frames_per_batch`` and ``ppo.minibatch_size`` are
    global and each rank collects and trains on its share (``device=cuda``: ``cuda:LOCAL_RANK``)."""
    return shard_config(cfg, dp, ("collector.frames_per_batch", "ppo.minibatch_size"))


def load_weights(module: torch.nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` with a :class:`CheckpointError` that says what to do when
    the checkpoint was written by a differently sized network."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), lines[0] if lines else "")
        raise CheckpointError(f"the checkpoint's {what} weights do not fit the network this config builds "
                              f"({detail[:240]}); resume without model.* / env.* overrides that change sizes") from None


def preflight(cfg: MAPPOConfig, resume_state: Optional[dict]) -> None:
    """Builds what can fail before anything is written: the env (scenario or factory), the
    networks from its specs and, on resume, the checkpoint's weights loaded into them."""
    num_envs = cfg.collector.frames_per_batch // cfg.env.max_steps
    if cfg.env.factory:  # the env contract first: every problem of the user's env named, one per line
        from torchrl_dreamer.check_env import check_factory
        from torchrl_dreamer.dreamer.envs import EnvContractError

        problems = check_factory(cfg.env.factory, "mappo", num_envs=num_envs, kwargs=dict(cfg.env.kwargs),
                                 device=cfg.device, seed=cfg.seed, max_steps=cfg.env.max_steps)
        if problems:
            raise EnvContractError(cfg.env.factory, "mappo", problems)
    env = make_env_from_config(cfg, num_envs=num_envs, seed=cfg.seed)
    try:
        _, policy, critic = make_agent(env, cfg.model, cfg.device)
        if resume_state is not None:
            load_weights(policy, resume_state["policy"], "policy")
            load_weights(critic, resume_state["critic"], "critic")
    finally:
        env.close()


RECIPE_SPEC = Recipe(
    name=RECIPE, schema=MAPPOConfig, config_dir=CONFIG_DIR, default_env="navigation", description=__doc__,
    validate=validate, preflight=preflight, train=train, evaluate=evaluate_checkpoint,
    run_name=lambda cfg: cfg.env.factory.replace(":", ".") if cfg.env.factory else cfg.env.scenario,
    progress=("iteration", "collector.iterations", "iterations"), log_step="frames",
    required=("policy", "critic", "iteration", "frames"), factory_env="custom", data_parallel=True,
)


main, cli = entry_points(RECIPE_SPEC)


if __name__ == "__main__":
    cli()
