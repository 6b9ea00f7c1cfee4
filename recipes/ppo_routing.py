"""PPO + pointer network on TSP / CVRP (the routing baseline).

    python -m recipes.ppo_routing --env tsp20                     # train, greedy dev gap logged
    python -m recipes.ppo_routing --env cvrp20 run.time_budget_s=1800
    python -m recipes.ppo_routing --evaluate runs/ppo_routing/tsp20/<stamp> eval.multistart=true eval.augment=8

Each iteration samples ``ppo.batch_instances`` fresh instances, decodes them all with the
current policy (one batched env, one encoder pass per episode), computes per-step GAE on the
dense rewards (minus each leg), or with ``ppo.advantage=shared`` the POMO-style shared baseline
over ``ppo.rollouts_per_instance`` rollouts of each instance (``ppo.multistart=true``: POMO-style,
rollout j starts at node j and the rollouts of an instance share one encoder pass), and runs
``ppo.epochs`` passes over minibatches of episodes.
Every ``eval.every`` iterations the greedy policy decodes the dev set and ``eval/gap_pct`` is
logged. Layers: ``recipes/configs/ppo_routing/base.yaml`` <- ``<env>.yaml`` <- CLI overrides.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel

from baselines.pointer_ppo import (
    compute_advantage, compute_shared_advantage, evaluate_dev, multistart_nodes, ppo_routing_update, rollout,
)
from envs.routing import CVRPEnv, DevSetError, TSPEnv, dev_set_path, load_dev_set
from torchrl_dreamer.checkpoint import (
    CheckpointError, averaged_weights, load_checkpoint, rng_state, set_rng_state, weight_average,
)
from torchrl_dreamer.config import Choice, ConfigError, check_ranges, config_errors, doc
from torchrl_dreamer.distributed import SINGLE, DataParallel, data_parallel
from torchrl_dreamer.distributed import rank_config as shard_config
from torchrl_dreamer.guards import check_finite
from torchrl_dreamer.evaluation import draw_picture, evaluation_paths, note, report_evaluation
from torchrl_dreamer.routing_eval import (
    RoutingEnvConfig, decoding_name, dev_tours_title, plot_decoded_tours, routing_eval_record,
)
from torchrl_dreamer.pointer import PointerActorCritic
from torchrl_dreamer.runtime import check_device
from torchrl_dreamer.trainer import (
    EvalConfig, LrSchedule, Recipe, RunConfig, TrainingRun, entry_points, lr_multiplier, run_progress,
)

CONFIG_DIR = Path(__file__).parent / "configs" / "ppo_routing"
ENV_CONFIG_DIR = CONFIG_DIR.parent / "routing"  # env YAMLs shared with the Dreamer routing recipe
RECIPE = "ppo_routing"


class Advantage(Choice):
    gae = "gae"
    shared = "shared"


@dataclass
class ModelConfig:
    embed_dim: int = doc(128, "Node embedding size.")
    n_layers: int = doc(3, "Transformer encoder layers.")
    n_heads: int = doc(8, "Attention heads (encoder and decoder glimpse).")
    ff_dim: int = doc(512, "Encoder feed-forward width.")
    tanh_clip: float = doc(10.0, "Logit clipping C in C * tanh(logits).")


@dataclass
class PPOConfig:
    batch_instances: int = doc(512, "Instances decoded per iteration.")
    minibatch_instances: int = doc(128, "Episodes per minibatch (one encoder pass each).")
    epochs: int = doc(3, "Passes over each batch.")
    lr: float = doc(1e-4, "Adam learning rate.")
    lr_schedule: LrSchedule = doc(LrSchedule.constant, "constant, or cosine: decay to lr * lr_final_fraction over "
                                                       "the run (progress = the larger of iterations done / "
                                                       "train.iterations and time used / run.time_budget_s).")
    lr_final_fraction: float = doc(0.1, "Cosine schedule: final learning rate as a fraction of ppo.lr.")
    lr_decay_start: float = doc(0.0, "Cosine schedule: progress (0-1) at which the decay starts; the rate is "
                                     "held at ppo.lr before it (0: decay over the whole run).")
    clip_epsilon: float = doc(0.2, "PPO ratio clip.")
    gamma: float = doc(1.0, "Discount (1: the objective is the whole tour).")
    lmbda: float = doc(0.95, "GAE lambda.")
    entropy_coef: float = doc(0.0, "Entropy bonus weight.")
    critic_coef: float = doc(0.5, "Critic loss weight.")
    max_grad_norm: float = doc(1.0, "Global gradient-norm clip.")
    normalize_advantage: bool = doc(True, "Standardise advantages per minibatch (over active steps).")
    advantage: Advantage = doc(Advantage.gae, "gae (critic + GAE) or shared (POMO-style: episode return minus the "
                                              "mean over the rollouts of the same instance; needs "
                                              "rollouts_per_instance >= 2).")
    rollouts_per_instance: int = doc(1, "Rollouts of each training instance per batch (batch_instances / this "
                                        "distinct instances).")
    symmetric_rollouts: bool = doc(False, "Give the rollouts of one instance different symmetries of the unit square.")
    multistart: bool = doc(False, "POMO-style training: rollout j of each instance is forced to start at node j "
                                  "(CVRP: customer j+1); forced moves are not trained on. Without symmetric_rollouts "
                                  "the K rollouts share one encoder pass.")
    first_move_coef: float = doc(0.05, "With multistart: weight of the cross-entropy that teaches the first move the "
                                      "start of each group's shortest tour (greedy decoding chooses its own start); with "
                                      "symmetric_rollouts every symmetric view is taught that start.")
    ema_decay: float = doc(0.0, "Keep an exponential moving average of the policy weights (torch.optim.swa_utils."
                                "AveragedModel), updated after every iteration; eval/gap_pct and --evaluate then use "
                                "the average and eval/gap_pct_last the last iterate. 0 = off; e.g. 0.99.")


@dataclass
class TrainConfig:
    iterations: int = doc(1000, "Training iterations.")


@dataclass
class PPORoutingEvalConfig(EvalConfig):
    every: int = doc(10, "Greedy dev-set evaluation every N iterations (0 = only at the end).")
    multistart: bool = doc(False, "--evaluate: best of all first nodes (POMO-style multi-start).")
    augment: int = doc(1, "--evaluate: best over this many (1-8) symmetric copies of each instance.")


@dataclass
class PPORoutingConfig:
    """Every default of the recipe; ``configs/routing/<env>.yaml`` (shared with Dreamer) sets the problem
    and ``configs/ppo_routing/<env>.yaml`` what differs for PPO."""
    seed: int = doc(0, "Seed for torch and the instance generator.")
    device: str = doc("cpu", "Device (cpu, cuda, ...).")
    threads: int = doc(0, "torch intra-op threads (0 = torch default).")
    env: RoutingEnvConfig = doc(RoutingEnvConfig(), "Problem.")
    model: ModelConfig = doc(ModelConfig(), "Pointer network.")
    ppo: PPOConfig = doc(PPOConfig(), "PPO.")
    train: TrainConfig = doc(TrainConfig(), "Training length.")
    eval: PPORoutingEvalConfig = doc(PPORoutingEvalConfig(), "Evaluation.")
    run: RunConfig = doc(RunConfig(checkpoint_every=20), "Run directory, logging, checkpoints.")


def validate(cfg: PPORoutingConfig) -> None:
    check_ranges(cfg, {
        "threads": ">= 0", "env.size": ">= 2", "env.capacity": ">= 0",
        "model.embed_dim": ">= 1", "model.n_layers": ">= 0", "model.n_heads": ">= 1", "model.ff_dim": ">= 1",
        "model.tanh_clip": "> 0",
        "ppo.batch_instances": ">= 1", "ppo.minibatch_instances": ">= 1", "ppo.epochs": ">= 1", "ppo.lr": "> 0",
        "ppo.clip_epsilon": "> 0", "ppo.gamma": "(0, 1]", "ppo.lmbda": "[0, 1]", "ppo.entropy_coef": ">= 0",
        "ppo.critic_coef": ">= 0", "ppo.max_grad_norm": "> 0", "ppo.first_move_coef": ">= 0",
        "train.iterations": ">= 1", "eval.every": ">= 0", "run.checkpoint_every": ">= 1", "run.time_budget_s": ">= 0",
    })
    if cfg.model.embed_dim % cfg.model.n_heads:
        raise ConfigError(f"model.n_heads ({cfg.model.n_heads}) must divide model.embed_dim ({cfg.model.embed_dim})")
    if cfg.env.problem == "cvrp" and 0 < cfg.env.capacity < 9:
        raise ConfigError(f"env.capacity ({cfg.env.capacity}) is below the largest customer demand (9): some "
                          "customers could never be served; use 0 (the standard capacity for env.size) or >= 9")
    check_device(cfg.device)
    if cfg.ppo.minibatch_instances > cfg.ppo.batch_instances:
        raise ConfigError("ppo.minibatch_instances exceeds ppo.batch_instances")
    if not 1 <= cfg.eval.augment <= 8:
        raise ConfigError(f"eval.augment must be in 1..8, got {cfg.eval.augment}")
    with config_errors("env.dev_set", DevSetError):
        if cfg.env.dev_set:
            load_dev_set(cfg.env.dev_set, cfg.env.problem, cfg.env.size)
    if not 0.0 <= cfg.ppo.lr_final_fraction <= 1.0:
        raise ConfigError(f"ppo.lr_final_fraction must be in [0, 1], got {cfg.ppo.lr_final_fraction}")
    if not 0.0 <= cfg.ppo.lr_decay_start < 1.0:
        raise ConfigError(f"ppo.lr_decay_start must be in [0, 1), got {cfg.ppo.lr_decay_start}")
    if not 0.0 <= cfg.ppo.ema_decay < 1.0:
        raise ConfigError(f"ppo.ema_decay must be in [0, 1), got {cfg.ppo.ema_decay}")
    k = cfg.ppo.rollouts_per_instance
    if k < 1 or cfg.ppo.batch_instances % k:
        raise ConfigError(f"ppo.rollouts_per_instance ({k}) must be >= 1 and divide ppo.batch_instances "
                          f"({cfg.ppo.batch_instances})")
    if cfg.ppo.multistart and not 2 <= k <= cfg.env.size:
        raise ConfigError(f"ppo.multistart needs 2 <= ppo.rollouts_per_instance <= env.size ({cfg.env.size}), got {k}")
    if cfg.ppo.multistart and cfg.ppo.minibatch_instances % k:
        raise ConfigError(f"ppo.multistart: ppo.minibatch_instances ({cfg.ppo.minibatch_instances}) must be a "
                          f"multiple of ppo.rollouts_per_instance ({k}) so that groups stay whole")
    if cfg.ppo.advantage == "shared" and k < 2:
        raise ConfigError("ppo.advantage=shared needs ppo.rollouts_per_instance >= 2")
    for key in ("batch_instances", "minibatch_instances", "epochs"):
        if getattr(cfg.ppo, key) <= 0:
            raise ConfigError(f"ppo.{key} must be > 0")
    dp = data_parallel(cfg.device)
    if dp.enabled:  # under torchrun: each rank's share must keep instance groups whole too
        local = rank_config(cfg, dp)
        for key in ("batch_instances", "minibatch_instances"):
            if getattr(local.ppo, key) % k:
                raise ConfigError(f"ppo.{key}={getattr(cfg.ppo, key)} split over {dp.world_size} ranks gives "
                                  f"{getattr(local.ppo, key)} per rank, not a multiple of ppo.rollouts_per_instance "
                                  f"({k})")


def rank_config(cfg: PPORoutingConfig, dp: DataParallel) -> PPORoutingConfig:
    """This rank's config under ``torchrun``: ``ppo.batch_instances`` and ``ppo.minibatch_instances`` are
    global and each rank takes its share (``device=cuda``: ``cuda:LOCAL_RANK``); unchanged in one process."""
    return shard_config(cfg, dp, ("ppo.batch_instances", "ppo.minibatch_instances"))


def make_model(cfg: PPORoutingConfig) -> PointerActorCritic:
    m = cfg.model
    return PointerActorCritic(cfg.env.problem, m.embed_dim, m.n_layers, m.n_heads, m.ff_dim, m.tanh_clip).to(cfg.device)


def make_train_env(cfg: PPORoutingConfig, seed: int):
    groups = {"instance_repeats": cfg.ppo.rollouts_per_instance, "symmetric_repeats": cfg.ppo.symmetric_rollouts}
    if cfg.env.problem == "tsp":
        return TSPEnv(num_nodes=cfg.env.size, batch_size=cfg.ppo.batch_instances, device=cfg.device, seed=seed, **groups)
    return CVRPEnv(num_customers=cfg.env.size, batch_size=cfg.ppo.batch_instances,
                   capacity=cfg.env.capacity or None, device=cfg.device, seed=seed, **groups)


def make_ema(cfg: PPORoutingConfig, model: PointerActorCritic) -> Optional[AveragedModel]:
    """The EMA of the policy weights (``ppo.ema_decay > 0``), or None. Reuses torch's AveragedModel."""
    return weight_average(model, cfg.ppo.ema_decay)


def lr_factor(cfg: PPORoutingConfig, done_iterations: int, elapsed_s: float) -> float:
    """Learning-rate multiplier: 1 (constant) or a cosine from 1 to ``lr_final_fraction`` over the
    run's progress (iterations or, with a time budget, wall clock; whichever is further along).
    With ``lr_decay_start`` > 0 the multiplier stays 1 until that progress and the cosine spans the
    rest of the run."""
    progress = run_progress(done_iterations, cfg.train.iterations, elapsed_s, cfg.run.time_budget_s)
    return lr_multiplier(cfg.ppo.lr_schedule, progress, decay_start=cfg.ppo.lr_decay_start,
                         final_fraction=cfg.ppo.lr_final_fraction)


def load_weights(model: torch.nn.Module, state: dict) -> None:
    """``model.load_state_dict(state)`` with a :class:`CheckpointError` that says what to do when the
    checkpoint was written by a differently sized (or other problem's) network."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), lines[0] if lines else "")
        raise CheckpointError(f"the checkpoint's weights do not fit the network this config builds ({detail[:240]}); "
                              "resume without model.* / env.problem overrides") from None


def preflight(cfg: PPORoutingConfig, resume_state: Optional[dict]) -> None:
    """Builds the network (and, on resume, loads the checkpoint into it) before anything is written."""
    model = make_model(cfg)
    if resume_state is not None:
        load_weights(model, resume_state["model"])


def train(cfg: PPORoutingConfig, run_dir: Path, resume_state: Optional[dict] = None) -> dict[str, float]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dp = data_parallel(cfg.device)  # torchrun: this rank decodes its share of the batch (see rank_config)
    global_batch, cfg = cfg.ppo.batch_instances, rank_config(cfg, dp)
    torch.manual_seed(cfg.seed)
    model, optimizer, ema, start, instances = restore(cfg, resume_state)
    if dp.enabled:
        dp.broadcast_module(model)  # every rank starts from rank 0's weights
        if ema is not None:
            dp.broadcast_module(ema)
        if dp.rank:
            torch.manual_seed(cfg.seed + 7919 * dp.rank + start)  # own minibatch order and decoding samples
    env = make_train_env(cfg, seed=cfg.seed + start + 1_000_003 * dp.rank)  # own instances per rank
    first_nodes, group_size = multistart_setup(cfg)
    dev = load_dev_set(cfg.env.dev_set, cfg.env.problem, cfg.env.size) if cfg.env.dev_set else None
    eval_model = model if ema is None else ema.module
    k = cfg.ppo.rollouts_per_instance  # logged step = rollouts decoded (k per distinct instance)
    pictures = [("tours.png", lambda: plot_dev_tours(eval_model, dev, cfg.env.problem, run_dir / "tours.png",
                                                     dev_set=cfg.env.dev_set))] if dev is not None else []
    if dev is None:
        note("tours.png not drawn: no dev set (env.dev_set is empty)")
    metrics: dict[str, float] = {}
    with TrainingRun(run_dir, run_cfg=cfg.run, total=cfg.train.iterations, initial=start, unit="iter",
                     resume_state=resume_state, resume_step=instances, postfix=POSTFIX, curves=CURVES,
                     x_label="training instances" if k == 1 else f"training rollouts ({k} per instance)",
                     pictures=pictures, dp=dp) as run:
        for iteration in range(start + 1, cfg.train.iterations + 1):
            t0 = time.perf_counter()
            lr = cfg.ppo.lr * lr_factor(cfg, iteration - 1, run.elapsed())
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.eval()
            batch = rollout(env, model, first_nodes=first_nodes, group_size=group_size)
            if cfg.ppo.advantage == "shared":
                compute_shared_advantage(batch, k)
            else:
                compute_advantage(batch, cfg.ppo.gamma, cfg.ppo.lmbda)
            for key in ("value", "advantage", "value_target", "log_prob"):
                check_finite(key, batch[key], iteration=iteration, run_dir=run.rd)
            t1 = time.perf_counter()
            model.train()
            metrics = update_step(cfg, model, batch, optimizer, group_size, iteration=iteration, run_dir=run.rd,
                                  dp=dp)
            if ema is not None:
                ema.update_parameters(model)
            t2 = time.perf_counter()
            instances += global_batch
            metrics.update(batch_metrics(cfg, batch, iteration, instances, lr, t0, t1, t2, global_batch))
            out_of_time = run.out_of_time()
            last = iteration == cfg.train.iterations or out_of_time
            if dev is not None and run.is_main and run.due(iteration, cfg.eval.every, last):
                metrics.update(run.evaluated(evaluate_with_ema(cfg, model, ema, dev), iteration=iteration))
            metrics.update({"time/iteration_s": time.perf_counter() - t0, "time/total_s": run.elapsed()})
            run.log(metrics, step=instances)  # log, then checkpoint (see TrainingRun)
            if run.due(iteration, cfg.run.checkpoint_every, last):
                run.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                          "ema": ema.state_dict() if ema is not None else None, "instances": instances,
                          "rng": rng_state()})
            run.logger.advance()
            if out_of_time:
                run.budget_reached(iteration)
                break
    return metrics


POSTFIX = {"eval/gap_pct": "gap%", "train/tour_length": "len", "time/instances_per_s": "inst/s"}
CURVES = (
    ("dev gap (%)", ("eval/gap_pct", "eval/gap_pct_last")), ("tour length", ("train/tour_length", "eval/tour_length")),
    ("losses", ("loss/objective", "loss/critic")), ("seconds", ("time/iteration_s",)),
)


def restore(cfg: PPORoutingConfig, resume_state: Optional[dict]):
    """Model, Adam, the weight average (or None), the iteration and the instance count: fresh, or
    as the checkpoint left them (with its RNG states)."""
    model = make_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.ppo.lr)
    start, instances = 0, 0
    if resume_state is not None:
        load_weights(model, resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
    ema = make_ema(cfg, model)
    if resume_state is not None:
        if ema is not None and resume_state.get("ema") is not None:
            ema.load_state_dict(resume_state["ema"])
        start, instances = resume_state["iteration"], resume_state["instances"]
        set_rng_state(resume_state["rng"])
    return model, optimizer, ema, start, instances


def multistart_setup(cfg: PPORoutingConfig):
    """``ppo.multistart``: the forced first node of every rollout and the rollouts per encoder pass."""
    if not cfg.ppo.multistart:
        return None, 1
    first_nodes = multistart_nodes(cfg.env.problem, cfg.env.size, cfg.ppo.batch_instances,
                                   cfg.ppo.rollouts_per_instance).to(cfg.device)
    return first_nodes, 1 if cfg.ppo.symmetric_rollouts else cfg.ppo.rollouts_per_instance


def update_step(cfg: PPORoutingConfig, model, batch, optimizer, group_size: int, *, iteration: int, run_dir: str,
                dp: DataParallel = SINGLE):
    """``ppo.epochs`` passes of clipped-PPO minibatch steps over one batch (see baselines.pointer_ppo;
    ``dp``: gradients summed over the data-parallel ranks)."""
    p = cfg.ppo
    return ppo_routing_update(
        model, batch, optimizer, epochs=p.epochs, minibatch_instances=p.minibatch_instances,
        clip_epsilon=p.clip_epsilon, entropy_coef=p.entropy_coef, critic_coef=p.critic_coef,
        max_grad_norm=p.max_grad_norm, normalize_advantage=p.normalize_advantage, group_size=group_size,
        first_move_coef=p.first_move_coef if p.multistart else 0.0,
        instance_group=p.rollouts_per_instance if p.multistart else 0, iteration=iteration, run_dir=run_dir, dp=dp,
    )


def batch_metrics(cfg: PPORoutingConfig, batch, iteration: int, instances: int, lr: float, t0: float, t1: float,
                  t2: float, global_batch: int = 0) -> dict[str, float]:
    """The iteration's scalars (the batch statistics are this rank's; the rate counts all ranks)."""
    active = batch["active"]
    return {
        "train/iteration": iteration, "train/instances": instances,
        "train/distinct_instances": instances // cfg.ppo.rollouts_per_instance,
        "train/tour_length": batch["tour_length"][:, 0].mean().item(),
        "train/episode_reward_sum": batch["reward"].sum(1).mean().item(), "train/lr": lr,
        "diag/value_mean": batch["value"][active].mean().item(),
        "diag/value_target_min": batch["value_target"][active].min().item(),
        "diag/value_target_max": batch["value_target"][active].max().item(),
        "time/rollout_s": t1 - t0, "time/update_s": t2 - t1,
        "time/instances_per_s": (global_batch or cfg.ppo.batch_instances) / (t2 - t0),
    }


def evaluate_with_ema(cfg: PPORoutingConfig, model, ema, dev: dict) -> dict[str, float]:
    """Greedy dev-set decoding of the weight average (or the model); with an average, also the last iterate."""
    ev = evaluate_dev(model if ema is None else ema.module, dev, problem=cfg.env.problem)
    out = {"eval/gap_pct": ev["gap_pct"], "eval/tour_length": ev["tour_length"], "time/eval_decode_s": ev["decode_s"]}
    if ema is not None:
        out["eval/gap_pct_last"] = evaluate_dev(model, dev, problem=cfg.env.problem)["gap_pct"]
    return out


def plot_dev_tours(model: PointerActorCritic, data: dict, problem: str, path: Path, k: int = 4, *,
                   dev_set: str = "") -> Path:
    """Greedy tours of the first ``k`` dev instances beside the reference solutions (PNG); the title
    names the decoding and the set (``dev_set``: the configured spec). Greedy decoding of fixed
    instances draws no random numbers: the same weights give the same picture."""
    k = min(k, data["locs"].shape[0])
    inst = {key: v[:k] for key, v in data.items() if key in ("locs", "depot", "demand", "capacity")}
    device = next(model.parameters()).device
    env = TSPEnv(instances=inst, device=device) if problem == "tsp" else CVRPEnv(instances=inst, device=device)
    was_training = model.training
    model.eval()
    out = rollout(env, model, greedy=True)
    model.train(was_training)
    return plot_decoded_tours(data, problem, out["action"].tolist(), out["tour_length"][:, 0].tolist(), path,
                              title=dev_tours_title("PPO", "greedy", data, k, str(dev_set_path(dev_set)) if dev_set else ""))


def evaluate_checkpoint(cfg: PPORoutingConfig, run_dir: Path) -> dict:
    """Dev-set evaluation of a run's checkpoint (``run_dir``: the run directory or a checkpoint file
    in one) with the decoding ``eval.multistart`` / ``eval.augment`` ask for (greedy: no random
    numbers, same weights -> same numbers). Prints the JSON line (:func:`routing_eval_record`, the
    same keys as Dreamer's) and writes it to ``<run dir>/eval.json`` before drawing
    ``<run dir>/tours.png`` (greedy tours); a read-only run directory only costs the files."""
    if not cfg.env.dev_set:
        raise ConfigError("--evaluate needs env.dev_set")
    target = run_dir
    run_dir, checkpoint, suffix = evaluation_paths(target)
    state = load_checkpoint(target, map_location=cfg.device)
    model = make_model(cfg)
    # the weight average where the run kept one: what eval/gap_pct measured during training
    load_weights(model, averaged_weights(state, key="model"))
    data = load_dev_set(cfg.env.dev_set, cfg.env.problem, cfg.env.size)
    result = evaluate_dev(model, data, problem=cfg.env.problem,
                          multistart=cfg.eval.multistart, augment=cfg.eval.augment)
    record = routing_eval_record(cfg, algo="ppo", run_dir=run_dir, checkpoint=checkpoint,
                                 dev_set_file=str(dev_set_path(cfg.env.dev_set)),
                                 decoding=decoding_name(cfg.eval.multistart, cfg.eval.augment),
                                 iteration=state["iteration"], instances=data["locs"].shape[0], **result)
    report_evaluation(record, run_dir, f"eval{suffix}.json")
    draw_picture(f"tours{suffix}.png", plot_dev_tours, model, data, cfg.env.problem, run_dir / f"tours{suffix}.png",
                 dev_set=cfg.env.dev_set)
    return record


RECIPE_SPEC = Recipe(
    name=RECIPE, schema=PPORoutingConfig, config_dir=CONFIG_DIR, default_env="tsp20", description=__doc__,
    validate=validate, preflight=preflight, train=train, evaluate=evaluate_checkpoint,
    run_name=lambda cfg: f"{cfg.env.problem}{cfg.env.size}",
    progress=("iteration", "train.iterations", "iterations"), log_step="instances",
    required=("model", "optimizer", "iteration", "instances"), env_config_dir=ENV_CONFIG_DIR, data_parallel=True,
)


main, cli = entry_points(RECIPE_SPEC)


if __name__ == "__main__":
    cli()
