"""Pointer network and the PPO routing baseline (smoke level; learning targets live in benchmarks)."""
import json
import math

import pytest
import torch

from recipes.ppo_routing import main
from baselines.pointer_ppo import augment_xy, compute_advantage, compute_shared_advantage, evaluate_dev, ppo_routing_update, rollout
from envs.routing import CVRPEnv, TSPEnv, generate_cvrp, generate_tsp, load_dev_set
from torchrl_dreamer.pointer import AllMaskedError, PointerActorCritic, masked_log_softmax

from helpers import BENCHMARKS, read_metrics

SMALL = dict(embed_dim=32, n_layers=1, n_heads=4, ff_dim=64)


def test_masked_log_softmax_exact_zero_and_finite():
    logits = torch.tensor([[5.0, -3.0, 40.0, 0.0]])
    mask = torch.tensor([[True, True, False, True]])
    lp = masked_log_softmax(logits, mask)
    assert lp.exp()[0, 2].item() == 0.0
    assert torch.isfinite(lp[mask]).all()
    assert lp.exp().sum().item() == pytest.approx(1.0)
    with pytest.raises(AllMaskedError, match=r"index \[1\]"):
        masked_log_softmax(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


@pytest.mark.parametrize("problem", ["tsp", "cvrp"])
def test_sampled_rollouts_are_legal_and_teacher_forcing_matches(problem):
    torch.manual_seed(0)
    model = PointerActorCritic(problem, **SMALL)
    env = TSPEnv(num_nodes=8, batch_size=32, seed=1) if problem == "tsp" else CVRPEnv(num_customers=8, batch_size=32, capacity=12, seed=1)
    batch = rollout(env, model, generator=torch.Generator().manual_seed(2))  # env raises on a masked node
    B, T = batch.batch_size
    assert batch["done"][:, -1].all()
    # recompute every step at once from the stored contexts: same log-probs as during the rollout
    cache = model.encode(batch["locs"][:, 0], batch["demand"][:, 0] if problem == "cvrp" else None)
    cap = batch["remaining_capacity"] if problem == "cvrp" else None
    lp, value = model.step(cache, batch["current_node"], batch["first_node"], cap, batch["action_mask"])
    recomputed = lp.gather(-1, batch["action"].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(recomputed, batch["log_prob"], atol=1e-5)
    assert torch.allclose(value.squeeze(-1), batch["value"], atol=1e-5)
    assert torch.isfinite(batch["log_prob"]).all()


def test_ppo_update_runs_and_reduces_critic_loss():
    torch.manual_seed(0)
    model = PointerActorCritic("tsp", **SMALL)
    env = TSPEnv(num_nodes=6, batch_size=64, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = rollout(env, model)
    compute_advantage(batch, gamma=1.0, lmbda=0.95)
    kw = dict(epochs=1, minibatch_instances=32, clip_epsilon=0.2, entropy_coef=0.01, critic_coef=0.5, max_grad_norm=1.0)
    first = ppo_routing_update(model, batch, opt, **kw)
    for _ in range(20):
        last = ppo_routing_update(model, batch, opt, **kw)
    assert last["loss/critic"] < first["loss/critic"]
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())


def test_augmentation_preserves_tour_lengths():
    locs = torch.rand(3, 7, 2)
    aug = augment_xy(locs, 8)
    tour = torch.arange(7)
    lengths = [(a[:, tour.roll(-1)] - a[:, tour]).norm(dim=-1).sum(-1) for a in aug]
    for length in lengths[1:]:
        assert torch.allclose(length, lengths[0], atol=1e-5)


@pytest.mark.parametrize("problem", ["tsp", "cvrp"])
def test_evaluate_dev_gap_multistart_and_augment(problem):
    torch.manual_seed(0)
    model = PointerActorCritic(problem, **SMALL)
    g = torch.Generator().manual_seed(4)
    data = generate_tsp(5, 6, g) if problem == "tsp" else generate_cvrp(5, 6, g, capacity=12)
    data["ref_cost"] = torch.ones(5, dtype=torch.float64)
    plain = evaluate_dev(model, data, problem=problem)
    best = evaluate_dev(model, data, problem=problem, multistart=True, augment=8)
    assert best["tour_length"] <= plain["tour_length"] + 1e-9  # more candidates never hurt
    assert plain["gap_pct"] == pytest.approx((plain["tour_length"] - 1) * 100)


def _closed_tour_lengths(problem, data, actions, active):
    """Reference tour lengths (float64) of decoded node sequences, from the dev set's coordinates
    alone, after checking each tour is complete (TSP: every node once; CVRP: every customer once,
    back at the depot)."""
    lengths = []
    for b in range(actions.shape[0]):
        seq = actions[b][active[b]].tolist()
        if problem == "tsp":
            points = data["locs"][b].double()
            assert sorted(seq) == list(range(points.shape[0])), b
            route = seq + seq[:1]
        else:
            points = torch.cat([data["depot"][b].view(1, 2), data["locs"][b]]).double()
            assert sorted(n for n in seq if n != 0) == list(range(1, points.shape[0])) and seq[-1] == 0, b
            route = [0, *seq]
        legs = points[route[1:]] - points[route[:-1]]
        lengths.append(float(legs.norm(dim=-1).sum()))
    return torch.tensor(lengths, dtype=torch.float64)


@pytest.mark.smoke
@pytest.mark.parametrize("env_name", ["tsp20", "cvrp20"])
def test_ppo_routing_smoke(env_name, tmp_runs, device_args):
    """Two iterations with a dev-set evaluation after each: the logged eval/tour_length and
    eval/gap_pct are those of the checkpointed policy's greedy tours on the bundled dev set,
    recomputed here from the coordinates and the reference costs (mean of per-instance gaps)."""
    from recipes.ppo_routing import PPORoutingConfig, make_model
    from torchrl_dreamer.checkpoint import load_checkpoint
    from torchrl_dreamer.config import load_config, to_object

    run_dir = main(["--env", env_name, *device_args, "train.iterations=2", "eval.every=1", "ppo.batch_instances=16",
                    "ppo.minibatch_instances=8", "ppo.epochs=1", "model.embed_dim=32", "model.n_layers=1",
                    "model.n_heads=4", "model.ff_dim=64", "run.progress=false", "run.tensorboard=false",
                    f"run.root={tmp_runs}"])
    records = read_metrics(run_dir)
    assert [r["train/iteration"] for r in records] == [1, 2]
    assert all("eval/gap_pct" in r and "eval/tour_length" in r for r in records)
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "curves.png").is_file()
    # the last evaluation, recomputed from the checkpoint (written after it) and the dev set
    cfg = to_object(load_config(PPORoutingConfig, [run_dir / "config.yaml"], ["device=cpu"]))
    model = make_model(cfg)
    model.load_state_dict(load_checkpoint(run_dir, map_location="cpu")["model"])
    model.eval()
    problem = cfg.env.problem
    data = load_dev_set(env_name, problem)
    inst = {k: v for k, v in data.items() if k in ("locs", "depot", "demand", "capacity")}
    with torch.no_grad():
        out = rollout(TSPEnv(instances=inst) if problem == "tsp" else CVRPEnv(instances=inst), model, greedy=True)
    lengths = _closed_tour_lengths(problem, data, out["action"], out["active"])
    gap = ((lengths / data["ref_cost"] - 1) * 100).mean().item()
    assert records[-1]["eval/tour_length"] == pytest.approx(lengths.mean().item(), rel=1e-7)
    assert records[-1]["eval/gap_pct"] == pytest.approx(gap, rel=1e-7)
    # ...and the first evaluation measured other weights (the update changed the policy)
    assert records[0]["eval/gap_pct"] != records[-1]["eval/gap_pct"]


@pytest.mark.smoke
@pytest.mark.parametrize("env_name", ["tsp20", "cvrp20"])
def test_evaluate_writes_tour_picture(env_name, tmp_runs, capsys):
    run_dir = main(["--env", env_name, "train.iterations=1", "eval.every=0", "ppo.batch_instances=8",
                    "ppo.minibatch_instances=8", "ppo.epochs=1", "model.embed_dim=16", "model.n_layers=1",
                    "model.n_heads=2", "model.ff_dim=32", "run.progress=false", "run.tensorboard=false",
                    f"run.root={tmp_runs}"])
    capsys.readouterr()
    main(["--evaluate", str(run_dir), "eval.augment=2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["decoding"] == "greedy+augment=2" and printed["gap_pct"] > 0
    assert json.loads((run_dir / "eval.json").read_text()) == printed  # saved as printed
    assert (run_dir / "tours.png").stat().st_size > 5000


def test_shared_baseline_advantage_exact():
    from tensordict import TensorDict

    # 2 instances x 2 rollouts; rollout 1 finished a step early (inactive last step)
    reward = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, 0.0], [-3.0, -1.0, -1.0], [-2.0, -1.0, -1.0]])
    active = torch.tensor([[True, True, True], [True, True, False], [True, True, True], [True, True, True]])
    batch = TensorDict({"reward": reward, "active": active}, batch_size=[4, 3])
    compute_shared_advantage(batch, 2)
    # episode returns -4, -2 (mean -3) and -5, -4 (mean -4.5)
    expected = torch.tensor([-1.0, 1.0, -0.5, 0.5]).unsqueeze(1) * active.float()
    assert torch.equal(batch["advantage"], expected)
    assert torch.equal(batch["value_target"][0], torch.tensor([-4.0, -3.0, -1.0]))
    assert torch.equal(batch["value_target"][1], torch.tensor([-2.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="group_size"):
        compute_shared_advantage(batch, 3)


@pytest.mark.smoke
def test_ppo_routing_shared_baseline_smoke_and_config_errors(tmp_runs):
    from torchrl_dreamer.config import ConfigError

    tiny = ["train.iterations=1", "eval.every=0", "ppo.batch_instances=16", "ppo.minibatch_instances=8",
            "ppo.epochs=1", "model.embed_dim=16", "model.n_layers=1", "model.n_heads=2", "model.ff_dim=32",
            "run.progress=false", "run.tensorboard=false", f"run.root={tmp_runs}"]
    run_dir = main(["--env", "cvrp20", "ppo.advantage=shared", "ppo.rollouts_per_instance=4",
                    "ppo.symmetric_rollouts=true", *tiny])
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train/instances"] == 16 and record["train/distinct_instances"] == 4
    with pytest.raises(ConfigError, match="rollouts_per_instance >= 2"):
        main(["--env", "tsp20", "ppo.advantage=shared", *tiny])
    with pytest.raises(ConfigError, match="divide"):
        main(["--env", "tsp20", "ppo.rollouts_per_instance=3", *tiny])
    with pytest.raises(ConfigError, match="ppo.advantage must be one of gae, shared"):
        main(["--env", "tsp20", "ppo.advantage=pomo", *tiny])
    # POMO-style multi-start training: forced distinct first nodes, one encoder pass per instance
    run_dir = main(["--env", "cvrp20", "ppo.advantage=shared", "ppo.rollouts_per_instance=8", "ppo.multistart=true",
                    *tiny])
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train/distinct_instances"] == 2 and "loss/first_move" in record
    assert all(map(math.isfinite, (record["loss/first_move"], record["loss/objective"])))
    # ... and with each rollout under its own symmetry the first-move term still trains
    run_dir = main(["--env", "cvrp20", "ppo.advantage=shared", "ppo.rollouts_per_instance=8", "ppo.multistart=true",
                    "ppo.symmetric_rollouts=true", *tiny])
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["loss/first_move"])
    with pytest.raises(ConfigError, match="rollouts_per_instance <= env.size"):
        main(["--env", "tsp20", "ppo.advantage=shared", "ppo.rollouts_per_instance=16", "ppo.multistart=true",
              "env.size=10", "env.dev_set=''", *tiny])  # (the tsp20 dev set would not fit size 10)
    with pytest.raises(ConfigError, match="multiple of ppo.rollouts_per_instance"):
        main(["--env", "tsp20", "ppo.advantage=shared", "ppo.rollouts_per_instance=16", "ppo.multistart=true", *tiny])


@pytest.mark.parametrize("problem", ["tsp", "cvrp"])
def test_multistart_groups_share_the_encoder_with_identical_outputs(problem):
    """POMO-style groups: rollouts of one instance encoded once (cache of B/K rows) give the same
    log-probs and values as encoding every row, both for single steps and stored trajectories;
    groups that hold different instances are refused."""
    from baselines.pointer_ppo import encode_groups, multistart_nodes, rollout, step_groups
    from envs.routing import CVRPEnv, TSPEnv

    torch.manual_seed(0)
    K, B, n = 4, 8, 6
    model = PointerActorCritic(problem, embed_dim=32, n_layers=1, n_heads=4, ff_dim=64)
    env = (TSPEnv(num_nodes=n, batch_size=B, seed=3, instance_repeats=K) if problem == "tsp"
           else CVRPEnv(num_customers=n, batch_size=B, capacity=10, seed=3, instance_repeats=K))
    first = multistart_nodes(problem, n, B, K)
    assert first.tolist() == ([0, 1, 2, 3] * 2 if problem == "tsp" else [1, 2, 3, 4] * 2)
    torch.manual_seed(1)
    out = rollout(env, model, first_nodes=first, group_size=K)
    assert out["forced"][:, 0].all() and not out["forced"][:, 1:].any()
    assert torch.equal(out["action"][:, 0], first)
    locs, demand = out["locs"][:, 0], (out["demand"][:, 0] if problem == "cvrp" else None)
    cap = out.get("remaining_capacity", None)
    args = (out["current_node"], out["first_node"], cap, out["action_mask"])
    lp_ref, v_ref = model.step(model.encode(locs, demand), *args)
    lp, v = step_groups(model, encode_groups(model, locs, demand, K), K, *args)
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(v, v_ref)
    # the stored log-probs (grouped single steps in the rollout) match the ungrouped recomputation
    stored = lp_ref.gather(-1, out["action"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out["log_prob"][out["active"]], stored[out["active"]], rtol=1e-4, atol=1e-4)
    bad = locs.clone()
    bad[1] += 0.01
    with pytest.raises(ValueError, match="different instances"):
        encode_groups(model, bad, demand, K)


def test_first_move_loss_moves_the_first_choice_towards_the_best_start():
    """Forced first moves are not trained by PPO; the first-move cross-entropy teaches greedy
    decoding to start where the group's shortest tour started."""
    from baselines.pointer_ppo import encode_groups, multistart_nodes, step_groups

    torch.manual_seed(0)
    K, B, n = 4, 8, 5
    model = PointerActorCritic("cvrp", embed_dim=16, n_layers=1, n_heads=2, ff_dim=32)
    env = CVRPEnv(num_customers=n, batch_size=B, capacity=10, seed=2, instance_repeats=K)
    batch = rollout(env, model, first_nodes=multistart_nodes("cvrp", n, B, K), group_size=K)
    best = 2  # pretend the rollout that started at customer 3 (index 2 of each group) was shortest
    batch["reward"][:, 1] = torch.where(torch.arange(B) % K == best, 0.0, -1.0)
    compute_shared_advantage(batch, K)

    def first_logp():
        with torch.no_grad():
            locs, demand = batch["locs"][:, 0], batch["demand"][:, 0]
            lp, _ = step_groups(model, encode_groups(model, locs, demand, K), K, batch["current_node"][:, :1],
                                batch["first_node"][:, :1], batch["remaining_capacity"][:, :1],
                                batch["action_mask"][:, :1])
        return lp[::K, 0, best + 1]

    before = first_logp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        stats = ppo_routing_update(model, batch, opt, epochs=1, minibatch_instances=B, clip_epsilon=0.2,
                                   entropy_coef=0.0, critic_coef=0.0, max_grad_norm=10.0, group_size=K,
                                   first_move_coef=1.0)
    assert "loss/first_move" in stats
    assert (first_logp() > before + 0.1).all()


def test_first_move_loss_with_symmetric_rollouts_teaches_every_view_and_keeps_instances_whole(monkeypatch):
    """Multi-start + symmetric rollouts: each rollout is encoded under its own symmetry (no shared
    encoder pass), so the first-move term must group rows by instance, not by encoder pass (it
    used to be silently off), teach every view the instance's best start, and minibatches must
    hold whole instances."""
    import baselines.pointer_ppo as routing
    from baselines.pointer_ppo import encode_groups, multistart_nodes, step_groups

    torch.manual_seed(0)
    K, B, n = 4, 8, 5
    model = PointerActorCritic("cvrp", embed_dim=16, n_layers=1, n_heads=2, ff_dim=32)
    env = CVRPEnv(num_customers=n, batch_size=B, capacity=10, seed=2, instance_repeats=K, symmetric_repeats=True)
    starts = multistart_nodes("cvrp", n, B, K)
    batch = rollout(env, model, first_nodes=starts, group_size=1)
    assert not torch.equal(batch["locs"][0, 0], batch["locs"][1, 0])  # the views differ
    best = 2  # pretend the rollout that started at customer 3 (index 2 of each group) was shortest
    batch["reward"][:, 1] = torch.where(torch.arange(B) % K == best, 0.0, -1.0)
    compute_shared_advantage(batch, K)
    batch["advantage"].zero_()  # only the first-move term trains (the PPO terms would move the views too)

    def first_logp():
        with torch.no_grad():
            locs, demand = batch["locs"][:, 0], batch["demand"][:, 0]
            lp, _ = step_groups(model, encode_groups(model, locs, demand, 1), 1, batch["current_node"][:, :1],
                                batch["first_node"][:, :1], batch["remaining_capacity"][:, :1],
                                batch["action_mask"][:, :1])
        return lp[:, 0, best + 1]  # every row: its own view's first choice

    # exact value on one instance's 4 views: every row's first-step log-prob of the best start
    losses, _ = routing.ppo_minibatch_loss(model, batch[:K], clip_epsilon=0.2, entropy_coef=0.0, critic_coef=0.0,
                                           group_size=1, first_move_coef=1.0, instance_group=K)
    with torch.no_grad():
        expected = -first_logp()[:K].mean()
    torch.testing.assert_close(losses["first_move"].detach(), expected)
    seen = []
    forward = routing.PointerPPOLoss.forward

    def recording(self, mb):
        seen.append(mb["action"][:, 0].clone())
        return forward(self, mb)

    monkeypatch.setattr(routing.PointerPPOLoss, "forward", recording)
    before = first_logp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        stats = ppo_routing_update(model, batch, opt, epochs=1, minibatch_instances=K, clip_epsilon=0.2,
                                   entropy_coef=0.0, critic_coef=0.0, max_grad_norm=10.0, group_size=1,
                                   first_move_coef=1.0, instance_group=K)
    assert "loss/first_move" in stats
    assert first_logp().mean() > before.mean() + 0.2
    # each minibatch is one whole instance: its K rollouts with their forced starts in order
    assert all(torch.equal(first, starts[:K]) for first in seen) and len(seen) == 5 * B // K
    with pytest.raises(ValueError, match="must divide"):
        ppo_routing_update(model, batch, opt, epochs=1, minibatch_instances=K + 2, clip_epsilon=0.2,
                           entropy_coef=0.0, critic_coef=0.0, max_grad_norm=10.0, group_size=1,
                           first_move_coef=1.0, instance_group=K)


@pytest.mark.smoke
def test_cosine_lr_schedule_follows_iterations_or_the_time_budget(tmp_runs):
    from recipes.ppo_routing import PPORoutingConfig, lr_factor
    from torchrl_dreamer.config import ConfigError, load_config, to_object

    cfg = to_object(load_config(PPORoutingConfig, [], ["ppo.lr_schedule=cosine", "ppo.lr_final_fraction=0.1",
                                                       "train.iterations=100"]))
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 0.0) == pytest.approx(0.55)
    assert lr_factor(cfg, 100, 0.0) == pytest.approx(0.1)
    cfg.run.time_budget_s = 60.0  # wall clock further along than the iterations: it decides
    assert lr_factor(cfg, 10, 60.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 10, 600.0) == pytest.approx(0.1)  # past the budget: stays at the floor
    cfg.ppo.lr_decay_start = 0.6  # held at 1 until 60% of the run, then the cosine spans the last 40%
    assert lr_factor(cfg, 30, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 80, 0.0) == pytest.approx(0.55)
    assert lr_factor(cfg, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 10, 48.0) == pytest.approx(0.55)  # 80% of the 60-s budget
    cfg.ppo.lr_schedule = "constant"
    assert lr_factor(cfg, 100, 600.0) == 1.0
    tiny = ["eval.every=0", "ppo.batch_instances=16", "ppo.minibatch_instances=8", "ppo.epochs=1",
            "model.embed_dim=16", "model.n_layers=1", "model.n_heads=2", "model.ff_dim=32", "run.progress=false",
            "run.tensorboard=false", f"run.root={tmp_runs}"]
    run_dir = main(["--env", "tsp20", "train.iterations=3", "ppo.lr_schedule=cosine", "ppo.lr=1e-3", *tiny])
    lrs = [json.loads(line)["train/lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
           if "train/lr" in line]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2]
    with pytest.raises(ConfigError, match="lr_schedule"):
        main(["--env", "tsp20", "ppo.lr_schedule=linear", *tiny])
    with pytest.raises(ConfigError, match="lr_decay_start"):
        main(["--env", "tsp20", "ppo.lr_schedule=cosine", "ppo.lr_decay_start=1.0", *tiny])


@pytest.mark.smoke
def test_time_budget_and_lr_schedule_continue_across_resume(tmp_runs):
    """run.time_budget_s counts the training seconds of every process of a run: the checkpoint
    stores them, a resume goes on from there (time/total_s, the budget, and a cosine lr schedule
    over the budget), and a resume whose budget is already spent is a clear error. It used to
    restart the clock, so the schedule replayed from the top."""
    from torchrl_dreamer.checkpoint import load_checkpoint, save_checkpoint
    from torchrl_dreamer.config import ConfigError

    lr = 1e-3
    tiny = ["eval.every=0", "env.dev_set=''", "ppo.batch_instances=8", "ppo.minibatch_instances=8", "ppo.epochs=1",
            "model.embed_dim=16", "model.n_layers=1", "model.n_heads=2", "model.ff_dim=32", f"ppo.lr={lr}",
            "ppo.lr_schedule=cosine", "ppo.lr_final_fraction=0.0", "run.progress=false", "run.tensorboard=false",
            f"run.root={tmp_runs}"]
    run_dir = main(["--env", "tsp20", "train.iterations=1", *tiny])
    state = load_checkpoint(run_dir)
    assert 0 < state["elapsed_s"] < 300
    state["elapsed_s"] = 1000.0  # pretend the first process trained for 1000 s
    save_checkpoint(run_dir / "checkpoint.pt", state)
    with pytest.raises(ConfigError, match="nothing to do: the run already trained 1000 s"):
        main(["--resume", str(run_dir), "train.iterations=5", "run.time_budget_s=1000"])
    main(["--resume", str(run_dir), "train.iterations=5", "run.time_budget_s=2000"])
    records = read_metrics(run_dir)
    resumed = [r for r in records if r["train/iteration"] > 1]
    assert [r["train/iteration"] for r in resumed] == [2, 3, 4, 5]
    assert all(1000 <= r["time/total_s"] < 1300 for r in resumed)
    # half the 2000 s budget is spent: the cosine stands at ~0.5 (restarting the clock gave 0.90 at
    # iteration 2, from the iteration count alone)
    assert 0.40 * lr < resumed[0]["train/lr"] <= 0.5 * lr
    assert load_checkpoint(run_dir)["elapsed_s"] >= 1000
    with pytest.raises(ConfigError, match="nothing to do: the run already has 5 iterations"):
        main(["--resume", str(run_dir)])


@pytest.mark.smoke
def test_ema_of_policy_weights_is_evaluated_checkpointed_and_resumed(tmp_runs, capsys):
    """ppo.ema_decay: after each iteration ema = d * ema + (1 - d) * weights (first: a copy); the dev
    gap is measured on the average (eval/gap_pct) and on the last iterate (eval/gap_pct_last); the
    checkpoint carries the average, --evaluate uses it and --resume continues it."""
    from recipes.ppo_routing import make_ema, make_model, PPORoutingConfig
    from torchrl_dreamer.checkpoint import load_checkpoint
    from torchrl_dreamer.config import ConfigError

    d = 0.9
    cfg = PPORoutingConfig()
    cfg.ppo.ema_decay = d
    model = make_model(cfg)
    ema = make_ema(cfg, model)
    p = next(model.parameters())
    ema.update_parameters(model)
    w0 = p.detach().clone()
    assert torch.equal(next(ema.module.parameters()), w0)
    with torch.no_grad():
        p.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(next(ema.module.parameters()), d * w0 + (1 - d) * (w0 + 1.0), atol=1e-6)

    tiny = ["eval.every=1", "ppo.batch_instances=8", "ppo.minibatch_instances=8", "ppo.epochs=1",
            "model.embed_dim=16", "model.n_layers=1", "model.n_heads=2", "model.ff_dim=32", "ppo.lr=1e-2",
            "run.progress=false", "run.tensorboard=false", f"run.root={tmp_runs}", "ppo.ema_decay=0.5"]
    run_dir = main(["--env", "tsp20", "train.iterations=2", *tiny])
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval/gap_pct"] > 0 and record["eval/gap_pct_last"] > 0
    state = load_checkpoint(run_dir)
    ema_w = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert state["ema"]["n_averaged"] == 2
    assert any(not torch.equal(ema_w[k], v) for k, v in state["model"].items())  # an average, not a copy
    capsys.readouterr()
    main(["--evaluate", str(run_dir)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["gap_pct"] == pytest.approx(record["eval/gap_pct"], rel=1e-6)
    main(["--resume", str(run_dir), "train.iterations=3", *tiny])
    assert load_checkpoint(run_dir)["ema"]["n_averaged"] == 3
    with pytest.raises(ConfigError, match="ema_decay"):
        main(["--env", "tsp20", "train.iterations=1", *tiny, "ppo.ema_decay=1.0"])


@pytest.mark.parametrize("env_name", ["tsp20", "cvrp20"])
def test_multistart20_preset_layers_and_validates(env_name):
    """recipes/configs/ppo_routing/multistart20.yaml (the CVRP20 benchmark's settings) is a valid
    layer over base + env YAML, and a typo in it would be refused (strict keys)."""
    from recipes.ppo_routing import CONFIG_DIR, ENV_CONFIG_DIR, PPORoutingConfig, validate
    from torchrl_dreamer.config import load_config, to_object

    files = [CONFIG_DIR / "base.yaml", ENV_CONFIG_DIR / f"{env_name}.yaml", CONFIG_DIR / "multistart20.yaml"]
    cfg = to_object(load_config(PPORoutingConfig, files, []))
    validate(cfg)
    assert cfg.ppo.multistart and cfg.ppo.advantage == "shared" and cfg.ppo.rollouts_per_instance == 20
    assert cfg.ppo.ema_decay == 0.99 and cfg.env.size == 20
    assert cfg.ppo.lr == 2e-4 and cfg.ppo.lr_schedule == "cosine" and cfg.ppo.lr_decay_start == 0.7


def test_routing_benchmark_plot_draws_both_curves_and_the_target(tmp_path, monkeypatch):
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("routing_ppo", None)
    plot_curve = importlib.import_module("routing_ppo").plot_curve
    import matplotlib.pyplot as plt

    saved = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, path, **kw: saved.update(fig=self, path=path))
    results = {"env": "cvrp20", "curve": [[60.0, 100, 12.0], [120.0, 200, 9.0]],
               "curve_gap_pct_last_iterate": [13.0, 9.5]}
    plot_curve(results, tmp_path / "c.png")
    ax = saved["fig"].axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["last iterate", "EMA weights", "target 8%"]
    assert list(ax.get_lines()[1].get_ydata()) == [12.0, 9.0] and "9.00%" in ax.get_title()
    del results["curve_gap_pct_last_iterate"]
    results["env"] = "tsp50"  # no target for this env, no EMA curve
    plot_curve(results, tmp_path / "d.png")
    assert [line.get_label() for line in saved["fig"].axes[0].get_lines()] == ["greedy gap"]
