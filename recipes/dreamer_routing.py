"""DreamerV3 on TSP / CVRP with a pointer actor, exact imagined masks and carried static context.

    python -m recipes.routing --algo dreamer --env tsp20                 # same env YAMLs as PPO
    python -m recipes.routing --algo dreamer --env tsp20 ac.known_reward=true
    python -m recipes.routing --algo dreamer --env cvrp20 run.time_budget_s=3600
    python -m recipes.routing --algo dreamer --evaluate runs/dreamer_routing/tsp20/<stamp>

Layers: ``configs/dreamer_routing/base.yaml`` <- ``configs/routing/<env>.yaml`` (shared with PPO)
<- ``configs/dreamer_routing/<env>.yaml`` if present <- CLI overrides. Each iteration decodes
``train.episodes_per_iter`` fresh instances with the current policy (uniformly random moves during
prefill), stores the episodes (one instance per replay sequence) and runs as many updates as
``replay.train_ratio`` asks; the greedy policy decodes the dev set every ``eval.every`` iterations.
Design notes: :mod:`torchrl_dreamer.dreamer.routing`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tensordict import TensorDict
from torch.optim.swa_utils import AveragedModel
from torchrl.data import LazyTensorStorage, ReplayBuffer

from envs.routing import KOOL_CAPACITY, CVRPEnv, DevSetError, TSPEnv, dev_set_path, load_dev_set
from torchrl_dreamer.dreamer.config import OptimConfig, WorldModelLossConfig
from torchrl_dreamer.checkpoint import (
    CheckpointError, averaged_weights, load_checkpoint, rng_state, set_rng_state, weight_average,
)
from torchrl_dreamer.config import ConfigError, check_ranges, config_errors, doc
from torchrl_dreamer.cpu import compile_unavailable, tune_malloc
from torchrl_dreamer.dreamer.agent import DreamerAgent
from torchrl_dreamer.dreamer.imagination import ImaginationModule, imagine
from torchrl_dreamer.dreamer.losses import DreamerPolicyLoss, DreamerCriticLoss, DreamerWorldModelLoss
from torchrl_dreamer.dreamer.routing import (
    RoutingHooks,
    RoutingSizes,
    dreamer_rollout,
    episode_length_bound,
    make_routing_agent,
)
from torchrl_dreamer.dreamer.update import DreamerUpdate, make_optimizer, terminal_calibration
from torchrl_dreamer.dreamer.update import set_learning_rates as set_optimizer_rates
from torchrl_dreamer.evaluation import draw_picture, evaluation_paths, note, report_evaluation
from torchrl_dreamer.routing_eval import RoutingEnvConfig, dev_tours_title, plot_decoded_tours, routing_eval_record
from torchrl_dreamer.runtime import check_device
from torchrl_dreamer.trainer import (
    EvalConfig, Recipe, RunConfig, TrainingRun, entry_points, run_progress,
)

CONFIG_DIR = Path(__file__).parent / "configs" / "dreamer_routing"
ENV_CONFIG_DIR = Path(__file__).parent / "configs" / "routing"
RECIPE = "dreamer_routing"


@dataclass
class RoutingOptimConfig(OptimConfig):
    compile: bool = doc(False, "torch.compile the optimizer step (the same LaProp + AGC update as one graph; tested "
                               "equal). CVRP20 agent, one thread: 261 against 266 ms per update, ~40 s to compile "
                               "once. Falls back to eager with a warning where torch.compile cannot run.")
    ema_decay: float = doc(0.0, "Keep an exponential moving average of the agent's weights (torch.optim.swa_utils."
                                "AveragedModel), updated after every iteration's updates; eval/gap_pct, --evaluate "
                                "and tours.png then use the average and eval/gap_pct_last the last iterate. "
                                "0 = off; e.g. 0.8.")


@dataclass
class RoutingModelConfig:
    embed_dim: int = doc(128, "Node embedding size (pointer encoder, as the PPO baseline).")
    encoder_layers: int = doc(3, "Transformer encoder layers.")
    heads: int = doc(8, "Attention heads.")
    ff_dim: int = doc(512, "Encoder feed-forward width.")
    deter: int = doc(256, "GRU state size.")
    hidden: int = doc(128, "GRU input size.")
    units: int = doc(128, "MLP width (heads, critic, step embedding).")
    layers: int = doc(1, "MLP layers.")
    stoch: int = doc(16, "Categorical latents G.")
    classes: int = doc(16, "Classes per latent C.")
    blocks: int = doc(4, "GRU blocks.")
    action_dim: int = doc(32, "RSSM action input: projection of the chosen node's embedding.")
    tanh_clip: float = doc(10.0, "Pointer logit clipping C * tanh(.).")
    unimix: float = doc(0.01, "Uniform mix (latents; policy over allowed nodes only).")
    load_features: bool = doc(False, "CVRP: the unserved demand (in vehicle loads) and the unvisited-customer fraction "
                                     "join the exact state scalars of every feature (world model, actor, critic).")
    actor_encoder: bool = doc(False, "The actor encodes each instance with its own encoder, trained by the actor loss "
                                     "(as the PPO baseline's); otherwise it reads the world model's node embeddings.")


@dataclass
class RoutingACConfig:
    horizon: int = doc(15, "Imagination horizon H.")
    discount: float = doc(0.997, "Discount gamma.")
    lmbda: float = doc(0.95, "Lambda of the lambda-returns.")
    entropy_coef: float = doc(3e-4, "Actor entropy bonus.")
    known_reward: bool = doc(False, "Imagined reward = exact leg length from the coordinates (else the reward head).")
    start_fraction: float = doc(0.25, "Imagine from this fraction of the replayed states.")
    live_starts: bool = doc(False, "Draw the imagination starts from the non-terminal rows (of each batch, ~40% of CVRP's "
                                   "padded rows are finished states that imagine nothing).")
    group_size: int = doc(1, "Trajectories imagined per start (same total); > 1: every move's advantage is its "
                             "trajectory's return minus the mean of the other K - 1 from the same start (a "
                             "POMO-style shared baseline) instead of the critic's R_t - V(s_t).")
    stop_when_done: bool = doc(False, "Stop stepping the world model in imagination once every imagined tour is complete "
                                      "(exact, from the carried visited set) and fill the rest of the horizon without it: "
                                      "same trajectories and losses (tested), cheaper when the horizon covers whole tours.")
    slow_critic_fraction: float = doc(0.02, "EMA fraction of the slow critic.")
    slow_reg_scale: float = doc(1.0, "Critic regulariser towards the slow critic.")
    return_decay: float = doc(0.99, "EMA decay of the return percentile range.")


@dataclass
class RoutingReplayConfig:
    capacity: int = doc(20_000, "Episodes kept.")
    batch_size: int = doc(16, "Episodes per update (each a sequence of states).")
    train_ratio: float = doc(32.0, "Replayed states per collected state.")
    prefill: int = doc(512, "Episodes decoded with uniformly random legal moves before the first update.")
    trim_padding: bool = doc(False, "Cut each sampled batch after its longest episode (rows past every episode's end "
                                    "carry no loss weight; the train ratio still counts the padded length).")


@dataclass
class RoutingTrainConfig:
    iterations: int = doc(100_000, "Training iterations (collect + updates).")
    episodes_per_iter: int = doc(64, "Instances decoded per iteration (one batched env).")
    curriculum: str = doc("", "Problem-size curriculum before env.size, as 'size:iterations,...' "
                              "(e.g. '5:100,10:100' trains 100 iterations on 5 nodes, 100 on 10, then env.size). "
                              "The replay restarts at each size; the dev set (env.size) is evaluated throughout.")


@dataclass
class RoutingEvalConfig(EvalConfig):
    every: int = doc(20, "Greedy dev-set decoding every N iterations (0 = only at the end).")
    diag_starts: int = doc(64, "Episodes imagined from their start for the imagined-vs-real tour diagnostic.")


@dataclass
class DreamerRoutingConfig:
    """Every default of the recipe; ``configs/routing/<env>.yaml`` (shared with PPO) sets the problem."""
    seed: int = doc(0, "Seed for torch and the instance generator.")
    device: str = doc("cpu", "Device of networks, envs and replay.")
    threads: int = doc(0, "torch intra-op threads (0 = torch default).")
    tune_malloc: bool = doc(True, "glibc mallopt tuning (see torchrl_dreamer/cpu.py).")
    env: RoutingEnvConfig = doc(RoutingEnvConfig(), "Problem (shared with the PPO recipe).")
    model: RoutingModelConfig = doc(RoutingModelConfig(), "Networks.")
    loss: WorldModelLossConfig = doc(WorldModelLossConfig(), "World-model loss.")
    ac: RoutingACConfig = doc(RoutingACConfig(), "Imagination, actor, critic.")
    optim: RoutingOptimConfig = doc(RoutingOptimConfig(world_model_lr=3e-4, actor_lr=1e-4, critic_lr=1e-4, warmup_steps=100),
                             "Optimiser (LaProp + AGC; higher rates and a shorter warm-up than the paper's).")
    replay: RoutingReplayConfig = doc(RoutingReplayConfig(), "Replay.")
    train: RoutingTrainConfig = doc(RoutingTrainConfig(), "Training length.")
    eval: RoutingEvalConfig = doc(RoutingEvalConfig(), "Evaluation and diagnostics.")
    run: RunConfig = doc(RunConfig(checkpoint_every=50), "Run directory, logging, checkpoints.")


def validate(cfg: DreamerRoutingConfig) -> None:
    check_ranges(cfg, {
        "threads": ">= 0", "env.size": ">= 2", "env.capacity": ">= 0",
        "model.embed_dim": ">= 1", "model.encoder_layers": ">= 0", "model.heads": ">= 1", "model.ff_dim": ">= 1",
        "model.deter": ">= 1", "model.hidden": ">= 1", "model.units": ">= 1", "model.layers": ">= 0",
        "model.stoch": ">= 1", "model.classes": ">= 2", "model.blocks": ">= 1", "model.action_dim": ">= 1",
        "model.tanh_clip": "> 0", "model.unimix": "[0, 1)",
        "loss.dyn_scale": ">= 0", "loss.rep_scale": ">= 0", "loss.free_bits": ">= 0",
        "loss.reconstruction_scale": ">= 0", "loss.reward_scale": ">= 0", "loss.continue_scale": ">= 0",
        "loss.terminal_weight": "> 0", "loss.terminal_reward_weight": "> 0",
        "ac.horizon": ">= 1", "ac.discount": "(0, 1]", "ac.lmbda": "[0, 1]", "ac.entropy_coef": ">= 0",
        "ac.group_size": ">= 1", "ac.slow_critic_fraction": "(0, 1]", "ac.slow_reg_scale": ">= 0", "ac.return_decay": "[0, 1)",
        "optim.world_model_lr": "> 0", "optim.actor_lr": "> 0", "optim.critic_lr": "> 0", "optim.agc": "> 0",
        "optim.eps": "> 0", "optim.warmup_steps": ">= 0", "optim.lr_decay_start": "[0, 1)",
        "optim.lr_final_fraction": "(0, 1]", "optim.ema_decay": "[0, 1)",
        "replay.prefill": ">= 0", "train.iterations": ">= 1", "eval.every": ">= 0", "eval.diag_starts": ">= 1",
        "run.checkpoint_every": ">= 1", "run.time_budget_s": ">= 0",
    })
    if cfg.model.deter % cfg.model.blocks:
        raise ConfigError(f"model.blocks ({cfg.model.blocks}) must divide model.deter ({cfg.model.deter})")
    if cfg.model.load_features and cfg.env.problem != "cvrp":
        raise ConfigError("model.load_features adds CVRP's demand features; env.problem is "
                          f"'{cfg.env.problem}' (set it to false)")
    if cfg.env.problem == "cvrp" and 0 < cfg.env.capacity < 9:
        raise ConfigError(f"env.capacity ({cfg.env.capacity}) is below the largest customer demand (9): some "
                          "customers could never be served; use 0 (the standard capacity for env.size) or >= 9")
    check_device(cfg.device)
    with config_errors("env.dev_set", DevSetError):
        if cfg.env.dev_set:
            load_dev_set(cfg.env.dev_set, cfg.env.problem, cfg.env.size)
    for key, value in {"replay.batch_size": cfg.replay.batch_size, "train.episodes_per_iter": cfg.train.episodes_per_iter,
                       "ac.horizon": cfg.ac.horizon, "replay.capacity": cfg.replay.capacity,
                       "replay.train_ratio": cfg.replay.train_ratio}.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if not 0 < cfg.ac.start_fraction <= 1:
        raise ConfigError("ac.start_fraction must be in (0, 1]")
    if cfg.model.embed_dim % cfg.model.heads:
        raise ConfigError(f"model.heads ({cfg.model.heads}) must divide model.embed_dim ({cfg.model.embed_dim})")
    curriculum_stages(cfg)


def curriculum_stages(cfg: DreamerRoutingConfig) -> list[tuple[int, int]]:
    """``train.curriculum`` parsed into ``[(size, last_iteration), ...]``; the final size runs forever."""
    stages, end = [], 0
    text = cfg.train.curriculum.strip()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            size, iters = (int(x) for x in part.split(":"))
        except ValueError:
            raise ConfigError(f"train.curriculum: expected 'size:iterations,...', got '{text}'") from None
        if size < 2 or iters <= 0:
            raise ConfigError(f"train.curriculum: sizes must be >= 2 and iterations > 0, got '{part}'")
        if cfg.env.problem == "cvrp" and size not in KOOL_CAPACITY:
            raise ConfigError(f"train.curriculum: CVRP sizes need a standard capacity, one of {sorted(KOOL_CAPACITY)}; "
                              f"got {size}")
        end += iters
        stages.append((size, end))
    return stages


def size_at(stages: list[tuple[int, int]], iteration: int, final: int) -> int:
    """Problem size trained at (1-based) ``iteration``."""
    for size, end in stages:
        if iteration <= end:
            return size
    return final


def sizes_of(cfg: RoutingModelConfig) -> RoutingSizes:
    return RoutingSizes(embed_dim=cfg.embed_dim, encoder_layers=cfg.encoder_layers, heads=cfg.heads, ff_dim=cfg.ff_dim,
                        deter=cfg.deter, hidden=cfg.hidden, units=cfg.units, layers=cfg.layers, stoch=cfg.stoch,
                        classes=cfg.classes, blocks=cfg.blocks, action_dim=cfg.action_dim, tanh_clip=cfg.tanh_clip,
                        load_features=cfg.load_features, actor_encoder=cfg.actor_encoder)


def make_env(cfg: DreamerRoutingConfig, *, batch: int, seed: int, instances=None, size: int | None = None):
    size = size or cfg.env.size
    if cfg.env.problem == "tsp":
        if instances is not None:
            return TSPEnv(instances=instances, device=cfg.device)
        return TSPEnv(num_nodes=size, batch_size=batch, device=cfg.device, seed=seed)
    if instances is not None:
        return CVRPEnv(instances=instances, device=cfg.device)
    # the env YAML's capacity belongs to env.size; smaller curriculum sizes use the generator's default
    capacity = cfg.env.capacity if size == cfg.env.size else 0
    return CVRPEnv(num_customers=size, batch_size=batch, capacity=capacity or None, device=cfg.device, seed=seed)


def build(cfg: DreamerRoutingConfig):
    """Agent, hooks, update step."""
    problem = cfg.env.problem
    wm, actor, critic = make_routing_agent(problem, sizes_of(cfg.model), cfg.model.unimix)
    agent = DreamerAgent(wm, actor, critic).to(cfg.device)
    hooks = RoutingHooks(problem, wm, actor, known_reward=cfg.ac.known_reward)
    lc, ac = cfg.loss, cfg.ac
    wm_loss = DreamerWorldModelLoss(wm, dyn_scale=lc.dyn_scale, rep_scale=lc.rep_scale, free_bits=lc.free_bits,
                             free_bits_grad=lc.free_bits_grad, reconstruction_scale=lc.reconstruction_scale,
                             reward_scale=lc.reward_scale, continue_scale=lc.continue_scale,
                             terminal_weight=lc.terminal_weight, terminal_reward_weight=lc.terminal_reward_weight)
    critic_loss = DreamerCriticLoss(critic, slow_fraction=ac.slow_critic_fraction, slow_reg_scale=ac.slow_reg_scale)
    inputs = ("action_mask", "current_node", "first_node") + (("remaining_capacity",) if problem == "cvrp" else ())
    actor_loss = DreamerPolicyLoss(actor, entropy_coef=ac.entropy_coef, return_decay=ac.return_decay, actor_input_keys=inputs,
                           actor_context_keys=actor.CONTEXT_KEYS, group_size=ac.group_size)
    for loss in (critic_loss, actor_loss):
        loss.make_value_estimator(gamma=ac.discount, lmbda=ac.lmbda)
    imagination = ImaginationModule(wm, actor, ac.horizon, hooks=hooks, start_fraction=ac.start_fraction,
                                    live_starts=ac.live_starts, group_size=ac.group_size,
                                    stop_when_done=ac.stop_when_done)
    oc = cfg.optim
    optimizer = make_optimizer(agent, world_model_lr=oc.world_model_lr, actor_lr=oc.actor_lr, critic_lr=oc.critic_lr,
                               agc=oc.agc, eps=oc.eps, warmup_steps=oc.warmup_steps, compile=oc.compile)
    return agent, hooks, DreamerUpdate(agent, wm_loss, critic_loss, actor_loss, imagination, optimizer)


EVAL_SEED_OFFSET = 20_000  # dev-set decoding draws its latent samples from cfg.seed + this
EVAL_CHUNK = 200  # dev instances decoded per batched env


@torch.no_grad()
def decode_dev(agent: DreamerAgent, cfg: DreamerRoutingConfig, data: dict, *, chunk: int = EVAL_CHUNK,
               limit: int | None = None, keep: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """Greedy decoding of the dev set (the first ``limit`` instances, default all): tour lengths
    ``[n]`` (float64, CPU) and the node sequences of the first ``keep`` instances.

    Greedy means the actor's mode action; the RSSM posterior still samples its latents, so the
    decoding runs under its own seed, ``cfg.seed + EVAL_SEED_OFFSET``, inside
    ``torch.random.fork_rng``: the same weights and seed give the same tours, and the caller's
    (training) RNG streams are exactly as before (torch CPU and CUDA are the only generators the
    decoding draws from). Chunks are decoded in order, so the first ``chunk`` instances decode
    the same whether or not the rest follow (the tours picture shows the evaluated tours)."""
    n = data["locs"].shape[0] if limit is None else min(limit, data["locs"].shape[0])
    lengths, actions = [], []
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + EVAL_SEED_OFFSET)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            inst = {k: v[start:stop] for k, v in data.items() if k in ("locs", "depot", "demand", "capacity")}
            env = make_env(cfg, batch=0, seed=0, instances=inst)
            rows, tour = dreamer_rollout(env, agent.world_model, agent.actor, mode="greedy")
            lengths.append(tour.double().cpu())
            if len(actions) < keep:
                moves = rows["valid"] & ~rows["is_terminal"]
                for i in range(min(keep - len(actions), stop - start)):
                    actions.append(rows["action"][i][moves[i]].argmax(-1).tolist())
    return torch.cat(lengths), actions


@torch.no_grad()
def evaluate_dev(agent: DreamerAgent, cfg: DreamerRoutingConfig, data: dict, chunk: int = EVAL_CHUNK) -> dict[str, float]:
    """Greedy decoding of the dev set (:func:`decode_dev`: seeded, leaves the caller's RNG alone):
    mean tour length, mean gap to ``ref_cost`` (%), time."""
    t0 = time.perf_counter()
    tour, _ = decode_dev(agent, cfg, data, chunk=chunk)
    gap = (tour / data["ref_cost"].double()[: tour.shape[0]] - 1) * 100
    return {"eval/gap_pct": gap.mean().item(), "eval/tour_length": tour.mean().item(),
            "time/eval_decode_s": time.perf_counter() - t0}


@torch.no_grad()
def plot_dev_tours(agent: DreamerAgent, cfg: DreamerRoutingConfig, data: dict, path: Path, k: int = 4, *,
                   decoded: tuple[torch.Tensor, list[list[int]]] | None = None) -> Path:
    """Greedy Dreamer tours of the first ``k`` dev instances beside the reference solutions (PNG).

    ``decoded``: :func:`decode_dev`'s output when the caller has it; otherwise the first chunk is
    decoded under the same seed, which gives the same tours as the dev-set evaluation."""
    if decoded is None:
        decoded = decode_dev(agent, cfg, data, limit=EVAL_CHUNK, keep=k)
    tour, actions = decoded
    k = min(k, len(actions))
    return plot_decoded_tours(data, cfg.env.problem, actions[:k], tour[:k].tolist(), path,
                              title=dev_tours_title("Dreamer", "greedy", data, k,
                                                    str(dev_set_path(cfg.env.dev_set)) if cfg.env.dev_set else ""))


@torch.no_grad()
def tour_diagnostics(agent: DreamerAgent, hooks: RoutingHooks, episodes: TensorDict, update: DreamerUpdate) -> dict[str, float]:
    """Imagined vs real tours of the same policy: from the posterior at the first state of replayed
    episodes, imagine whole episodes; compare the model's tour length (minus the predicted
    rewards) with the exact length of the same imagined tours, and the learned visited head
    with the exact visited set (``diag/imagined_mask_accuracy``)."""
    wm = agent.world_model
    _, states = update.world_model_loss(episodes)
    start = states[:, 0].select(*update.imagination.in_keys, *hooks.start_keys)
    T = episodes.shape[1]
    aux = hooks.start(start)
    context = hooks.actor_context(start)
    saved = hooks.known_reward
    hooks.known_reward = False
    ones = torch.ones(start.shape[0], device=start.device)
    model = imagine(wm, agent.actor, start["deter"], start["stoch"], ones, T - 1, hooks=hooks, aux=aux, context=context)
    hooks.known_reward = True
    exact_aux = hooks.start(start)
    exact_len = torch.zeros(start.shape[0], device=start.device)
    actions = model["action"]
    correct = total = 0.0
    for t in range(T - 1):
        # learned visited head vs the exact visited set at every imagined state of unfinished tours
        live = ~exact_aux["done"]
        predicted = wm.visited_logits(model["feat"][:, t], context["node_emb"]) > 0
        correct += float(((predicted == exact_aux["visited"]).float().mean(-1) * live).sum())
        total += float(live.sum())
        exact_aux, reward, _ = hooks.step(exact_aux, actions[:, t])
        exact_len -= reward
    hooks.known_reward = saved
    hooks.pop_invalid_rate()
    # the model's reward counts for moves made before the (exact) end of each imagined tour; CVRP tours
    # end before the T - 1 imagined steps, and the reward head is never trained past an episode's end
    model_len = -(model["reward"][:, 1:] * model["cont"][:, :-1]).sum(1)
    accuracy = torch.tensor(correct / max(total, 1.0))
    return {"diag/imagined_tour_length_model": model_len.mean().item(),
            "diag/imagined_tour_length_exact": exact_len.mean().item(),
            "diag/imagined_mask_accuracy": accuracy.item()}


def load_weights(agent: DreamerAgent, state: dict) -> None:
    """``agent.load_state_dict(state)`` with a :class:`CheckpointError` that says what to do when the
    checkpoint was written by a differently sized (or other problem's) agent."""
    try:
        agent.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), lines[0] if lines else "")
        raise CheckpointError(f"the checkpoint's weights do not fit the agent this config builds ({detail[:240]}); "
                              "resume without model.* / env.problem overrides") from None


def make_ema(cfg: DreamerRoutingConfig, agent: DreamerAgent) -> Optional[AveragedModel]:
    """The moving average of the agent's weights (``optim.ema_decay > 0``), or None. Reuses torch's
    ``AveragedModel`` (the critic is averaged too: one module, and it costs one small copy)."""
    return weight_average(agent, cfg.optim.ema_decay)


def evaluated_weights(state: dict) -> dict:
    """The agent weights a checkpoint's evaluation uses: the weight average when the run kept one (what
    ``eval/gap_pct`` measured during training), else the last iterate."""
    return averaged_weights(state)


def preflight(cfg: DreamerRoutingConfig, resume_state: Optional[dict]) -> None:
    """Builds the agent (and, on resume, loads the checkpoint into it) before anything is written."""
    agent, _, _ = build(cfg)
    if resume_state is not None:
        load_weights(agent, resume_state["agent"])
        if resume_state.get("ema") is not None:
            load_weights(agent, evaluated_weights(resume_state))


def train(cfg: DreamerRoutingConfig, run_dir: Path, resume_state: Optional[dict] = None) -> dict[str, float]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_malloc:
        tune_malloc()
    torch.manual_seed(cfg.seed)
    if cfg.optim.compile:
        reason = compile_unavailable(cfg.device)
        if reason is not None:
            print(f"warning: optim.compile=true but torch.compile does not work here ({reason}); the optimizer "
                  "steps eagerly (same update, ~5 ms more per update on CPU). optim.compile=false silences this.",
                  file=sys.stderr, flush=True)
            cfg.optim.compile = False
    agent, hooks, update = build(cfg)
    stages = curriculum_stages(cfg)
    size = size_at(stages, 1 if resume_state is None else resume_state["iteration"] + 1, cfg.env.size)
    env, T, rb = make_stage(cfg, size, 0)
    start_iter, episodes, updates, owed = restore(cfg, resume_state, agent, update, rb)
    ema = make_ema(cfg, agent)
    if ema is not None and resume_state is not None and resume_state.get("ema") is not None:
        ema.load_state_dict(resume_state["ema"])
    eval_agent = agent if ema is None else ema.module
    if resume_state is not None:
        env = make_env(cfg, batch=cfg.train.episodes_per_iter, seed=cfg.seed + start_iter, size=size)
    dev = load_dev_set(cfg.env.dev_set, cfg.env.problem, cfg.env.size) if cfg.env.dev_set else None
    if dev is None:
        note("tours.png not drawn: no dev set (env.dev_set is empty)")
    pictures = [("tours.png", lambda: plot_dev_tours(eval_agent, cfg, dev, run_dir / "tours.png"))] if dev is not None else []
    metrics: dict[str, float] = {}
    with TrainingRun(run_dir, run_cfg=cfg.run, total=cfg.train.iterations, initial=start_iter, unit="iter",
                     resume_state=resume_state, resume_step=episodes, postfix=POSTFIX, curves=CURVES,
                     x_label="training episodes (instances decoded, prefill included)", pictures=pictures) as run:
        for iteration in range(start_iter + 1, cfg.train.iterations + 1):
            t0 = time.perf_counter()
            if size_at(stages, iteration, cfg.env.size) != size:
                size = size_at(stages, iteration, cfg.env.size)
                (env, T, rb), owed = make_stage(cfg, size, iteration), 0.0
                run.logger.write(f"curriculum: iteration {iteration} trains on size {size} (replay restarted)")
            prefill = episodes < cfg.replay.prefill
            rows, tour = dreamer_rollout(env, agent.world_model, agent.actor, mode="random" if prefill else "sample",
                                         max_rows=T)
            rb.extend(rows)
            episodes += rows.shape[0]
            t1 = time.perf_counter()
            if not prefill:
                owed += float(rows["valid"].sum()) * cfg.replay.train_ratio / (cfg.replay.batch_size * T)
            lr_mult = set_learning_rates(update.optimizer, cfg, iteration - 1, run.elapsed())
            metrics, n_upd, owed = run_updates(update, rb, cfg.replay.batch_size, owed, iteration, run.rd,
                                               trim=cfg.replay.trim_padding)
            updates += n_upd
            if ema is not None and n_upd:
                ema.update_parameters(agent)
            t2 = time.perf_counter()
            metrics.update({
                "train/iteration": iteration, "train/episodes": episodes, "train/problem_size": size, "train/updates": updates,
                "train/lr_multiplier": lr_mult, "train/tour_length": tour.mean().item(), "train/episode_reward_sum": rows["reward"].sum(1).mean().item(),
                "diag/prefill": float(prefill), "diag/imagined_invalid_action_rate": hooks.pop_invalid_rate(),
                "time/collect_s": t1 - t0, "time/update_s": t2 - t1,
                "time/updates_per_s": n_upd / max(t2 - t1, 1e-9) if n_upd else 0.0,
            })
            out_of_time = run.out_of_time()  # read once: the last iteration still evaluates and checkpoints
            last = iteration == cfg.train.iterations or out_of_time
            if run.due(iteration, cfg.eval.every, last) and not prefill:
                if dev is not None:
                    ev = evaluate_dev(eval_agent, cfg, dev)
                    if ema is not None:
                        ev["eval/gap_pct_last"] = evaluate_dev(agent, cfg, dev)["eval/gap_pct"]
                    metrics.update(run.evaluated(ev, iteration=iteration))
                if len(rb) >= cfg.eval.diag_starts:
                    metrics.update(tour_diagnostics(agent, hooks, rb.sample(cfg.eval.diag_starts), update))
            metrics.update({"time/iteration_s": time.perf_counter() - t0, "time/total_s": run.elapsed()})
            run.log(metrics, step=episodes)  # log, then checkpoint (see TrainingRun)
            if run.due(iteration, cfg.run.checkpoint_every, last):
                run.save({"agent": agent.state_dict(), "optimizer": update.optimizer.state_dict(),
                          "critic_loss": update.critic_loss.state_dict(), "actor_loss": update.actor_loss.state_dict(),
                          "ema": ema.state_dict() if ema is not None else None,
                          "replay": None, "iteration": iteration, "episodes": episodes, "updates": updates,
                          "owed": owed, "rng": rng_state()})
            run.logger.advance()
            if out_of_time:
                run.budget_reached(iteration)
                break
    return metrics


POSTFIX = {"eval/gap_pct": "gap%", "train/tour_length": "len", "loss/world_model": "wm",
           "diag/imagined_invalid_action_rate": "inv"}
CURVES = (
    ("dev gap (%)", ("eval/gap_pct", "eval/gap_pct_last")),
    ("tour length", ("train/tour_length", "eval/tour_length", "diag/imagined_tour_length_model",
                     "diag/imagined_tour_length_exact")),
    ("value / target range", ("diag/value_min", "diag/value_max", "diag/lambda_return_min", "diag/lambda_return_max")),
    ("actor", ("diag/actor_entropy", "diag/imagined_invalid_action_rate")),
)


def make_stage(cfg: DreamerRoutingConfig, size: int, iteration: int):
    """Env, episode row bound and an empty replay for one problem size (curriculum stage)."""
    env = make_env(cfg, batch=cfg.train.episodes_per_iter, seed=cfg.seed + iteration, size=size)
    bound = episode_length_bound(cfg.env.problem, size + (1 if cfg.env.problem == "cvrp" else 0))
    storage = LazyTensorStorage(cfg.replay.capacity, device=cfg.device)
    return env, bound, ReplayBuffer(storage=storage)  # batch size given at each sample() call


def restore(cfg: DreamerRoutingConfig, resume_state: Optional[dict], agent: DreamerAgent, update: DreamerUpdate,
            rb: ReplayBuffer) -> tuple[int, int, int, float]:
    """Loads a checkpoint into the pieces (with its RNG states); returns ``(iteration, episodes,
    updates, owed)``, zeros for a new run."""
    if resume_state is None:
        return 0, 0, 0, 0.0
    load_weights(agent, resume_state["agent"])
    update.optimizer.load_state_dict(resume_state["optimizer"])
    update.critic_loss.load_state_dict(resume_state["critic_loss"])
    update.actor_loss.load_state_dict(resume_state["actor_loss"])
    if resume_state.get("replay") is not None:
        rb.load_state_dict(resume_state["replay"])
    set_rng_state(resume_state["rng"])
    return tuple(resume_state[k] for k in ("iteration", "episodes", "updates", "owed"))


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: DreamerRoutingConfig, done_iterations: int,
                       elapsed_s: float) -> float:
    """Sets each param group's rate to its configured rate times the schedule's multiplier at this point
    of the run (``optim.lr_schedule``; :func:`torchrl_dreamer.dreamer.update.set_learning_rates`);
    returns the multiplier."""
    progress = run_progress(done_iterations, cfg.train.iterations, elapsed_s, cfg.run.time_budget_s)
    return set_optimizer_rates(optimizer, cfg.optim, progress)


def trim_padding(batch: TensorDict) -> TensorDict:
    """``batch [B, T]`` of padded episodes -> ``[B, T']``, cut after the longest episode's final row
    (the rows cut are padding: no loss weight, nothing to imagine from)."""
    length = int(batch["valid"].sum(1).max())
    return batch[:, :max(length, 1)]


def run_updates(update: DreamerUpdate, rb: ReplayBuffer, batch_size: int, owed: float, iteration: int,
                run_dir: str, *, trim: bool = False) -> tuple[dict[str, float], int, float]:
    """As many updates as ``owed`` holds whole units; returns the mean metrics, the count and what is still owed.
    ``trim``: each batch is cut after its longest episode (:func:`trim_padding`)."""
    sums: dict[str, float] = {}
    n = 0
    while owed >= 1.0:
        batch = rb.sample(batch_size)
        for k, v in update(trim_padding(batch) if trim else batch, iteration=iteration, run_dir=run_dir).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        owed -= 1.0
    return terminal_calibration({k: v / n for k, v in sums.items()}), n, owed


def evaluate_checkpoint(cfg: DreamerRoutingConfig, run_dir: Path) -> dict:
    """Dev-set evaluation of a run's checkpoint (``run_dir``: the run directory or a checkpoint file
    in one): greedy decoding under ``cfg.seed + EVAL_SEED_OFFSET`` (same weights and seed, same
    numbers). Prints the JSON line (:func:`recipes.ppo_routing.routing_eval_record`, the same keys
    as PPO's) and writes it to ``<run dir>/eval.json`` before drawing ``<run dir>/tours.png`` (the
    evaluated tours of the first instances); a read-only run directory only costs the files."""
    if not cfg.env.dev_set:
        raise ConfigError("--evaluate needs env.dev_set")
    target = run_dir
    run_dir, checkpoint, suffix = evaluation_paths(target)
    state = load_checkpoint(target, map_location=cfg.device)
    agent, _, _ = build(cfg)
    load_weights(agent, evaluated_weights(state))
    data = load_dev_set(cfg.env.dev_set, cfg.env.problem, cfg.env.size)
    t0 = time.perf_counter()
    decoded = decode_dev(agent, cfg, data, keep=4)
    decode_s = time.perf_counter() - t0
    tour = decoded[0]
    gap = (tour / data["ref_cost"].double() - 1) * 100
    record = routing_eval_record(cfg, algo="dreamer", run_dir=run_dir, checkpoint=checkpoint, decoding="greedy",
                                 dev_set_file=str(dev_set_path(cfg.env.dev_set)),
                                 iteration=state["iteration"], instances=tour.shape[0], gap_pct=gap.mean().item(),
                                 tour_length=tour.mean().item(), decode_s=decode_s)
    report_evaluation(record, run_dir, f"eval{suffix}.json")
    draw_picture(f"tours{suffix}.png", plot_dev_tours, agent, cfg, data, run_dir / f"tours{suffix}.png",
                 decoded=decoded)
    return record


RECIPE_SPEC = Recipe(
    name=RECIPE, schema=DreamerRoutingConfig, config_dir=CONFIG_DIR, default_env="tsp20", description=__doc__,
    validate=validate, preflight=preflight, train=train, evaluate=evaluate_checkpoint,
    run_name=lambda cfg: f"{cfg.env.problem}{cfg.env.size}",
    progress=("iteration", "train.iterations", "iterations"), log_step="episodes",
    required=("agent", "iteration", "episodes", "updates"), env_config_dir=ENV_CONFIG_DIR,
)


main, cli = entry_points(RECIPE_SPEC)


if __name__ == "__main__":
    cli()
