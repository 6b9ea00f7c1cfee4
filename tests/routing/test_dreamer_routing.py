"""Dreamer on routing: exact imagined masks, never an illegal imagined move, finite log-probs, smoke runs."""
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torchrl.envs.utils import step_mdp

from envs.routing import CVRPEnv, TSPEnv
from recipes import routing
from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.dreamer.imagination import imagine
from torchrl_dreamer.dreamer.losses import imagined_steps
from torchrl_dreamer.dreamer.routing import RoutingHooks, RoutingSizes, dreamer_rollout, make_routing_agent

from helpers import DREAMER_ROUTING_TINY, read_metrics

SIZES = RoutingSizes(embed_dim=16, encoder_layers=1, heads=2, ff_dim=32, deter=16, hidden=8, units=16, stoch=4,
                     classes=4, blocks=2, action_dim=8, bins=31)


def _env(problem, batch, seed=0):
    if problem == "tsp":
        return TSPEnv(num_nodes=7, batch_size=batch, seed=seed)
    return CVRPEnv(num_customers=6, batch_size=batch, capacity=12, seed=seed)


def _start_row(td, problem, n):
    row = {"visited": td["visited"], "current_node": td["current_node"].reshape(-1),
           "first_node": td["first_node"].reshape(-1), "locs": td["locs"],
           "step_fraction": td["step_count"].reshape(-1).float() / n, "is_terminal": td["done"].reshape(-1)}
    if problem == "cvrp":
        row.update(demand=td["demand"], remaining_capacity=td["remaining_capacity"].reshape(-1))
    return TensorDict(row, batch_size=[td.shape[0]])


@pytest.mark.parametrize("problem", ["tsp", "cvrp"])
def test_imagined_masks_rewards_and_termination_equal_the_env(problem):
    torch.manual_seed(0)
    wm, actor, _ = make_routing_agent(problem, SIZES)
    hooks = RoutingHooks(problem, wm, actor, known_reward=True)
    g = torch.Generator().manual_seed(1)
    for episode in range(25):  # random legal rollouts of 32 instances each
        env = _env(problem, 32, seed=episode)
        td = env.reset()
        n = td["action_mask"].shape[-1]
        aux = hooks.start(_start_row(td, problem, n))
        for _ in range(3 * n):
            mask = hooks.actor_inputs(aux)["action_mask"]
            assert torch.equal(mask, td["action_mask"])
            action = torch.multinomial(mask.float(), 1, generator=g).squeeze(-1)
            td["action"] = action
            td = env.step(td)
            aux, reward, terminal = hooks.step(aux, F.one_hot(action, n).float())
            assert torch.allclose(reward, td["next", "reward"].reshape(-1), atol=1e-5)
            assert torch.equal(terminal, td["next", "done"].reshape(-1))
            td = step_mdp(td)
            if bool(td["done"].all()):
                break
        assert torch.equal(hooks.actor_inputs(aux)["action_mask"], td["action_mask"])  # finished rows too
    assert hooks.pop_invalid_rate() == 0.0


@pytest.mark.parametrize("problem", ["tsp", "cvrp"])
def test_no_masked_node_in_10k_imagined_steps_with_a_near_deterministic_actor(problem):
    torch.manual_seed(0)
    wm, actor, _ = make_routing_agent(problem, SIZES)
    with torch.no_grad():  # sharpen the pointer logits: near-deterministic policy
        actor.decoder.tanh_clip = 50.0
        for p in actor.feat_in.parameters():
            p.mul_(30.0)
    hooks = RoutingHooks(problem, wm, actor)
    env = _env(problem, 256)
    td = env.reset()
    n = td["action_mask"].shape[-1]
    node_emb, graph = wm.encode_instance(td["locs"], td.get("demand") if problem == "cvrp" else None)
    start = _start_row(td, problem, n)
    h, z = wm.rssm.initial(256)
    steps = 0
    while steps < 10_000:
        out = imagine(wm, actor, h, z, torch.ones(256), 2 * n, hooks=hooks, aux=hooks.start(start),
                      context=actor.precompute(node_emb, graph))
        steps += 256 * 2 * n
        taken = out["action"][:, :-1].argmax(-1)
        assert out["action_mask"][:, :-1].gather(-1, taken.unsqueeze(-1)).all()
        assert torch.isfinite(out["log_prob"]).all()
        # recompute the log-probs of the stored actions as the actor loss does: finite
        dist = actor(out["feat"][:, :-1], out["action_mask"][:, :-1], out["current_node"][:, :-1],
                     out["first_node"][:, :-1], out["remaining_capacity"][:, :-1] if problem == "cvrp" else None,
                     **actor.precompute(node_emb, graph))
        assert torch.isfinite(dist.log_prob(out["action"][:, :-1])).all()
        assert (dist.probs[~out["action_mask"][:, :-1]] == 0).all()
    assert hooks.pop_invalid_rate() == 0.0


@pytest.mark.parametrize("problem", ["tsp", "cvrp"])
def test_collected_rows_follow_the_world_model_layout(problem):
    torch.manual_seed(0)
    wm, actor, _ = make_routing_agent(problem, SIZES)
    env = _env(problem, 5)
    rows, tour = dreamer_rollout(env, wm, actor, mode="sample")
    valid = rows["valid"]
    assert rows["is_first"][:, 0].all() and not rows["is_first"][:, 1:].any()
    assert (rows["is_terminal"].sum(1) == 1).all()  # exactly one final state per episode
    last = valid.sum(1) - 1
    assert rows["is_terminal"].gather(1, last.unsqueeze(1)).all()
    assert torch.allclose(-rows["reward"].sum(1).double(), tour, atol=1e-4)  # rewards sum to minus the tour
    assert (rows["action"][rows["is_terminal"]] == 0).all()


@pytest.mark.smoke
@pytest.mark.parametrize("env_name", ["tsp20", "cvrp20"])
def test_dreamer_routing_smoke_and_algo_switch(env_name, tmp_runs, device_args):
    args = ["--algo", "dreamer", "--env", env_name, *DREAMER_ROUTING_TINY, f"run.root={tmp_runs}", "train.iterations=4",
            "train.episodes_per_iter=8", "replay.prefill=8", "replay.batch_size=4", "replay.train_ratio=4",
            "eval.every=2", "eval.diag_starts=4", *device_args]
    run_dir = routing.main(args)
    records = read_metrics(run_dir)
    last = records[-1]
    assert last["train/updates"] > 0 and last["eval/gap_pct"] > 0
    assert last["diag/imagined_invalid_action_rate"] == 0.0
    assert "diag/imagined_tour_length_model" in last and "diag/value_max" in last
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "curves.png").is_file()
    assert (run_dir / "tours.png").stat().st_size > 5000
    assert "dreamer_routing" in str(run_dir)


@pytest.mark.smoke
def test_dreamer_routing_curriculum_switches_sizes_and_validates(tmp_runs):
    args = ["--algo", "dreamer", "--env", "tsp20", *DREAMER_ROUTING_TINY, f"run.root={tmp_runs}", "train.iterations=5",
            "train.episodes_per_iter=8", "replay.prefill=8", "replay.batch_size=4", "replay.train_ratio=4",
            "eval.every=100", "eval.diag_starts=4", "train.curriculum=5:2,10:2"]
    run_dir = routing.main(args)
    records = read_metrics(run_dir)
    sizes = [r["train/problem_size"] for r in records if "train/problem_size" in r]
    assert sizes == [5, 5, 10, 10, 20]
    assert records[-1]["train/updates"] > records[1]["train/updates"] and records[-1]["eval/gap_pct"] > 0
    for bad in ("5-10", "1:3", "5:0"):
        with pytest.raises(ConfigError, match="curriculum"):
            routing.main([*args, f"train.curriculum={bad}"])


@pytest.mark.smoke
def test_dreamer_routing_resume_continues_counters_parameters_and_clock(tmp_runs, device_args):
    """``python -m recipes.routing --resume <run>`` (no ``--algo``: the run directory tells) goes on
    from the checkpoint: iteration, episodes, updates, optimizer steps, training seconds. It used
    to load the run's config with the PPO schema and fail."""
    from torchrl_dreamer.checkpoint import load_checkpoint

    args = ["--algo", "dreamer", "--env", "tsp20", *DREAMER_ROUTING_TINY, f"run.root={tmp_runs}", "train.iterations=3",
            "train.episodes_per_iter=8", "replay.prefill=8", "replay.batch_size=4", "replay.train_ratio=4",
            "eval.every=100", "eval.diag_starts=4", "env.dev_set=''", *device_args]
    run_dir = routing.main(args)
    first = load_checkpoint(run_dir)
    assert first["iteration"] == 3 and first["updates"] > 0 and first["elapsed_s"] > 0
    routing.main(["--resume", str(run_dir), "train.iterations=5"])
    second = load_checkpoint(run_dir)
    assert second["iteration"] == 5 and second["episodes"] == first["episodes"] + 16
    assert second["updates"] > first["updates"]
    steps = [g["step"] for g in second["optimizer"]["param_groups"]]
    assert all(s == second["updates"] for s in steps)  # the optimizer went on, not restarted
    records = read_metrics(run_dir)
    assert [r["train/iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["time/total_s"] >= first["elapsed_s"] for r in records[3:])
    with pytest.raises(ConfigError, match="nothing to do"):
        routing.main(["--resume", str(run_dir)])
    # the entry point took the algorithm from the run directory; a contradicting --algo is refused
    with pytest.raises(ConfigError, match="is a dreamer run: use --algo dreamer"):
        routing.main(["--algo", "ppo", "--resume", str(run_dir), "train.iterations=6"])


@pytest.mark.smoke
def test_dreamer_weight_average_is_evaluated_checkpointed_and_resumed(tmp_runs, capsys):
    """optim.ema_decay: after each iteration's updates ema = d * ema + (1 - d) * weights (first: a copy);
    eval/gap_pct decodes the average and eval/gap_pct_last the last iterate; the checkpoint carries the
    average, --evaluate decodes it (same figure as the log) and --resume continues it."""
    import json

    from recipes.dreamer_routing import evaluated_weights
    from torchrl_dreamer.checkpoint import load_checkpoint

    args = ["--algo", "dreamer", "--env", "cvrp20", *DREAMER_ROUTING_TINY, f"run.root={tmp_runs}", "train.iterations=3",
            "train.episodes_per_iter=8", "replay.prefill=8", "replay.batch_size=4", "replay.train_ratio=4",
            "eval.every=1", "eval.diag_starts=4", "optim.ema_decay=0.5", "optim.actor_lr=1e-2", "optim.world_model_lr=1e-2"]
    run_dir = routing.main(args)
    records = read_metrics(run_dir)
    last = records[-1]
    assert last["eval/gap_pct"] > 0 and last["eval/gap_pct_last"] > 0
    state = load_checkpoint(run_dir)
    assert state["ema"]["n_averaged"] == 2  # iterations 2 and 3 updated (iteration 1 is the prefill)
    averaged = evaluated_weights(state)
    assert averaged.keys() == state["agent"].keys()
    assert any(not torch.equal(averaged[k], v) for k, v in state["agent"].items())  # an average, not a copy
    assert evaluated_weights({**state, "ema": None}) is state["agent"]
    capsys.readouterr()
    routing.main(["--evaluate", str(run_dir)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["gap_pct"] == pytest.approx(last["eval/gap_pct"], rel=1e-6)
    assert printed["gap_pct"] != pytest.approx(last["eval/gap_pct_last"], rel=1e-6)
    routing.main(["--resume", str(run_dir), "train.iterations=4"])
    assert load_checkpoint(run_dir)["ema"]["n_averaged"] == 3
    with pytest.raises(ConfigError, match="ema_decay"):
        routing.main([*args, "optim.ema_decay=1.0"])


@pytest.mark.smoke
def test_cosine_schedule_scales_every_dreamer_learning_rate_and_validates(tmp_runs):
    """``optim.lr_schedule=cosine``: the world-model, actor and critic rates all follow the multiplier
    (logged as ``train/lr_multiplier``), from 1 down to ``optim.lr_final_fraction``."""
    from recipes.dreamer_routing import DreamerRoutingConfig, set_learning_rates
    from torchrl_dreamer.config import load_config, to_object

    cfg = to_object(load_config(DreamerRoutingConfig, [], ["optim.lr_schedule=cosine", "optim.lr_decay_start=0.5",
                                                           "optim.lr_final_fraction=0.1", "train.iterations=100",
                                                           "optim.world_model_lr=3e-4", "optim.actor_lr=2e-4",
                                                           "optim.critic_lr=1e-4"]))
    groups = [{"name": n, "lr": 0.0} for n in ("world_model", "actor", "critic")]
    opt = type("Opt", (), {"param_groups": groups})()
    assert set_learning_rates(opt, cfg, 40, 0.0) == pytest.approx(1.0)
    assert [g["lr"] for g in groups] == pytest.approx([3e-4, 2e-4, 1e-4])
    assert set_learning_rates(opt, cfg, 75, 0.0) == pytest.approx(0.55)
    assert [g["lr"] for g in groups] == pytest.approx([1.65e-4, 1.1e-4, 0.55e-4])
    cfg.run.time_budget_s = 100.0  # the clock is further along than the iterations: it decides
    assert set_learning_rates(opt, cfg, 10, 100.0) == pytest.approx(0.1)
    assert [g["lr"] for g in groups] == pytest.approx([3e-5, 2e-5, 1e-5])
    args = ["--algo", "dreamer", "--env", "tsp20", *DREAMER_ROUTING_TINY, f"run.root={tmp_runs}", "train.iterations=4",
            "train.episodes_per_iter=8", "replay.prefill=8", "replay.batch_size=4", "replay.train_ratio=4",
            "eval.every=100", "eval.diag_starts=4", "env.dev_set=''", "optim.lr_schedule=cosine"]
    mults = [r["train/lr_multiplier"] for r in read_metrics(routing.main(args))]
    assert mults[0] == pytest.approx(1.0) and mults[0] > mults[1] > mults[2] > mults[3] >= 0.1
    with pytest.raises(ConfigError, match="lr_schedule"):
        routing.main([*args, "optim.lr_schedule=linear"])
    with pytest.raises(ConfigError, match="lr_decay_start"):
        routing.main([*args, "optim.lr_decay_start=1.0"])


def test_load_features_are_the_unserved_demand_and_the_unvisited_customer_fraction():
    sizes = RoutingSizes(**{**SIZES.__dict__, "load_features": True})
    wm, _, _ = make_routing_agent("cvrp", sizes)
    demand = torch.tensor([[0.0, 0.2, 0.3, 0.5]])
    visited = torch.tensor([[[True, True, False, False], [True, True, True, True]]])  # [B=1, T=2, n=4]
    scalars = wm._scalars(torch.tensor([[0.25, 1.0]]), torch.tensor([[0.6, 1.0]]), visited, demand)
    assert scalars.shape == (1, 2, 4)
    assert torch.allclose(scalars[0, 0], torch.tensor([0.25, 0.6, 0.8, 2 / 3]))
    assert torch.allclose(scalars[0, 1], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="load_features needs"):
        wm._scalars(torch.tensor([0.5]), torch.tensor([1.0]))


def test_actor_with_its_own_encoder_is_trained_by_the_actor_loss_and_keeps_masks_exact():
    """``actor_encoder``: the actor's instance encoder gets gradients from the actor loss (the world
    model's encoder does not), one encoding per distinct instance, and imagination stays legal."""
    torch.manual_seed(0)
    sizes = RoutingSizes(**{**SIZES.__dict__, "actor_encoder": True, "load_features": True})
    wm, actor, _ = make_routing_agent("cvrp", sizes)
    hooks = RoutingHooks("cvrp", wm, actor)
    env = _env("cvrp", 6)
    td = env.reset()
    n = td["action_mask"].shape[-1]
    start = _start_row(td, "cvrp", n)
    start = torch.cat([start, start], 0)  # each instance twice: encoded once
    with torch.no_grad():
        node_emb, graph = wm.encode_instance(start["locs"], start["demand"])
    start.update({"node_emb": node_emb, "graph": graph})
    context = hooks.actor_context(start)
    assert not torch.equal(context["actor_node_emb"], context["node_emb"])
    assert torch.equal(context["actor_node_emb"][:6], context["actor_node_emb"][6:])
    h, z = wm.rssm.initial(12)
    out = imagine(wm, actor, h, z, torch.ones(12), 2 * n, hooks=hooks, aux=hooks.start(start), context=context)
    assert hooks.pop_invalid_rate() == 0.0
    dist = actor(out["feat"][:, :-1], out["action_mask"][:, :-1], out["current_node"][:, :-1],
                 out["first_node"][:, :-1], out["remaining_capacity"][:, :-1], **context)
    dist.log_prob(out["action"][:, :-1]).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in actor.encoder.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in actor.encoder.parameters())
    assert all(p.grad is None for p in wm.encoder.parameters())
    rows, tour = dreamer_rollout(_env("cvrp", 5), wm, actor, mode="greedy")  # acting uses the same context
    assert torch.isfinite(tour).all() and (rows["is_terminal"].sum(1) == 1).all()


def test_live_starts_imagine_from_unfinished_rows_and_trimming_keeps_the_world_model_loss():
    """``ac.live_starts``: the starts are the non-terminal rows while there are enough of them;
    ``replay.trim_padding``: cutting the padding leaves the world-model losses unchanged."""
    from recipes.dreamer_routing import trim_padding
    from torchrl_dreamer.dreamer.imagination import ImaginationModule
    from torchrl_dreamer.dreamer.losses import DreamerWorldModelLoss
    from torchrl_dreamer.dreamer.rssm import gumbel_noise

    torch.manual_seed(0)
    wm, actor, _ = make_routing_agent("cvrp", SIZES)
    rows, _ = dreamer_rollout(_env("cvrp", 6), wm, actor, mode="random", max_rows=20)
    assert not rows["valid"][:, -1].any()  # padded
    loss = DreamerWorldModelLoss(wm)
    _, states = loss(rows)
    trimmed = trim_padding(rows)
    assert trimmed.shape[1] == int(rows["valid"].sum(1).max()) < rows.shape[1]
    noise = gumbel_noise((*rows.shape, SIZES.stoch, SIZES.classes))  # the same posterior samples for both

    def core(td, eps):
        flags = [td[k].float() for k in ("reward", "is_first", "is_terminal", "valid")]
        _, losses, _ = loss._core({n: td[n] for n in wm.obs_names}, td["action"].float(), flags[1].bool(), flags[0],
                                  flags[2].bool(), flags[3], eps)
        return losses

    full, cut = core(rows, noise), core(trimmed, noise[:, :trimmed.shape[1]])
    for key in full:
        assert torch.allclose(full[key], cut[key], atol=1e-5), key
    hooks = RoutingHooks("cvrp", wm, actor)
    live = (~states["is_terminal"]).sum().item()
    for flag, expect_all_live in ((True, True), (False, False)):
        module = ImaginationModule(wm, actor, 3, hooks=hooks, start_fraction=0.5, live_starts=flag)
        torch.manual_seed(1)
        traj = module(states)
        n = traj.shape[0]
        assert n == round(states.numel() * 0.5) and n <= live
        assert bool((traj["cont"][:, 0] == 1).all()) == expect_all_live


def test_tour_diagnostic_counts_model_rewards_only_until_each_imagined_tour_ends():
    """CVRP tours end before the padded length: the model's reward after an imagined tour's end must
    not count towards its imagined length (a constant reward of -1 per move gives the move count)."""
    from recipes.dreamer_routing import DreamerRoutingConfig, build, tour_diagnostics
    from torchrl_dreamer.config import load_config, to_object

    torch.manual_seed(0)
    cfg = to_object(load_config(DreamerRoutingConfig, [], [*DREAMER_ROUTING_TINY, "env.problem=cvrp", "env.size=6",
                                                            "env.capacity=12"]))
    agent, hooks, update = build(cfg)
    rows, _ = dreamer_rollout(_env("cvrp", 8), agent.world_model, agent.actor, mode="random")
    T = rows.shape[1]
    agent.world_model.reward_head.mean = lambda logits: -torch.ones(logits.shape[:-1])
    out = tour_diagnostics(agent, hooks, rows, update)
    moves = out["diag/imagined_tour_length_model"]
    assert 6 + 1 <= moves < T - 1  # every customer and the final depot return; fewer than the padded steps


def test_routing_recipe_passes_the_terminal_weights_to_the_world_model_loss():
    from recipes.dreamer_routing import DreamerRoutingConfig, build
    from torchrl_dreamer.config import load_config, to_object

    cfg = to_object(load_config(DreamerRoutingConfig, [], [*DREAMER_ROUTING_TINY, "loss.terminal_weight=3",
                                                            "loss.terminal_reward_weight=5"]))
    _, _, update = build(cfg)
    assert (update.world_model_loss.terminal_weight, update.world_model_loss.terminal_reward_weight) == (3.0, 5.0)


def test_group_baseline_update_imagines_groups_from_one_start_with_exact_masks():
    """``ac.group_size``: the recipe's imagination and actor loss agree on the group size; the K
    trajectories of a group share their start (visited set, current node) and keep exact masks."""
    from recipes.dreamer_routing import DreamerRoutingConfig, build
    from torchrl_dreamer.config import load_config, to_object

    torch.manual_seed(0)
    cfg = to_object(load_config(DreamerRoutingConfig, [], [*DREAMER_ROUTING_TINY, "env.problem=cvrp", "env.size=6",
                                                            "env.capacity=12", "ac.group_size=4", "ac.live_starts=true"]))
    agent, hooks, update = build(cfg)
    assert update.imagination.group_size == update.actor_loss.group_size == 4
    rows, _ = dreamer_rollout(_env("cvrp", 8), agent.world_model, agent.actor, mode="random")
    _, states = update.world_model_loss(rows)
    traj = update.imagination(states)
    assert traj.shape[0] % 4 == 0
    for key in ("deter", "action_mask", "current_node"):
        start = traj[key][:, 0]
        groups = start.reshape(-1, 4, *start.shape[1:])
        assert torch.equal(groups, groups[:, :1].expand_as(groups)), key  # one start per group
    metrics = update(rows)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert hooks.pop_invalid_rate() == 0.0
    with pytest.raises(Exception, match="group_size"):
        build(to_object(load_config(DreamerRoutingConfig, [], [*DREAMER_ROUTING_TINY, "ac.group_size=0"])))


def test_stop_when_done_skips_the_model_after_every_tour_ended_and_keeps_the_losses():
    """``ac.stop_when_done``: imagination stops stepping the model once every imagined tour has ended
    and completes the same ``[N, H+1]`` layout; the trajectory equals the full loop's up to there, and
    the critic and actor losses are the full loop's, although both now run their networks on the
    imagined steps only (same gradients, same return normaliser)."""
    from recipes.dreamer_routing import DreamerRoutingConfig, build
    from torchrl_dreamer.config import load_config, to_object

    overrides = [*DREAMER_ROUTING_TINY, "env.problem=cvrp", "env.size=6", "env.capacity=12", "ac.horizon=30",
                 "ac.discount=1.0", "ac.lmbda=1.0", "ac.known_reward=true", "ac.group_size=4", "ac.live_starts=true"]
    trajs, losses, grads, scales = {}, {}, {}, {}
    for stop in (False, True):
        torch.manual_seed(0)
        cfg = to_object(load_config(DreamerRoutingConfig, [], [*overrides, f"ac.stop_when_done={stop}"]))
        agent, hooks, update = build(cfg)
        assert update.imagination.stop_when_done is stop
        rows, _ = dreamer_rollout(_env("cvrp", 8), agent.world_model, agent.actor, mode="random")
        _, states = update.world_model_loss(rows)
        torch.manual_seed(1)
        wm = agent.world_model
        heads = wm.reward_head.forward, wm.continue_head.forward

        def unused(*args, **kwargs):
            raise AssertionError("exact rewards and ends: imagination must not run the reward/continue heads")

        wm.reward_head.forward = wm.continue_head.forward = unused
        traj = trajs[stop] = update.imagination(states)
        wm.reward_head.forward, wm.continue_head.forward = heads
        critic_td, targets = update.critic_loss(traj)
        losses[stop] = (critic_td["loss_critic"], update.actor_loss(traj.update(targets))["loss_actor"])
        scales[stop] = update.actor_loss.return_normalizer.scale.clone()
        agent.zero_grad(set_to_none=True)
        sum(losses[stop]).backward()
        grads[stop] = [p.grad.clone() for p in (*agent.actor.parameters(), *agent.critic.parameters())
                       if p.grad is not None]
        if stop:
            metrics = update(rows)
            assert all(torch.isfinite(v).all() for v in metrics.values())
            assert hooks.pop_invalid_rate() == 0.0
    full, cut = trajs[False], trajs[True]
    assert full.shape == cut.shape and full.shape[1] == 31
    ended = int((cut["cont"] > 0).any(0).nonzero().max()) + 1  # the first state where every tour has ended
    assert 2 <= ended < 30  # a CVRP6 episode has at most 13 moves
    assert torch.equal(cut["feat"][:, ended:], cut["feat"][:, ended:ended + 1].expand_as(cut["feat"][:, ended:]))
    assert not torch.equal(full["feat"][:, ended + 1], full["feat"][:, ended])  # the full loop went on
    for key in ("action", "reward", "cont", "action_mask", "current_node", "log_prob", "entropy"):
        assert torch.equal(full[key], cut[key]), key  # after the end: the forced move, no reward, no continuation
    assert torch.equal(full["feat"][:, :ended + 1], cut["feat"][:, :ended + 1])
    for a, b in zip(losses[False], losses[True]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    # the losses ran their networks on s_0 .. s_ended only, and said so through the trajectory
    assert full["imagined"].all() and imagined_steps(full) is None
    assert int(cut["imagined"][0].sum()) == ended + 1 and imagined_steps(cut) == ended
    assert torch.equal(scales[False], scales[True])  # the percentiles still count the padding's zero returns
    assert len(grads[False]) == len(grads[True]) > 0
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
