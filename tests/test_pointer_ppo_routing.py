"""Pointer network and the PPO routing baseline (smoke level; learning targets live in benchmarks)."""
import json
from pathlib import Path

import pytest
import torch

from baselines.ppo_routing import main
from baselines.routing import augment_xy, compute_advantage, compute_shared_advantage, evaluate_dev, ppo_routing_update, rollout
from envs.routing import CVRPEnv, TSPEnv, generate_cvrp, generate_tsp
from torchrl_dreamer.pointer import AllMaskedError, PointerActorCritic, masked_log_softmax

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


@pytest.mark.parametrize("env_name", ["tsp20", "cvrp20"])
def test_ppo_routing_smoke(env_name, tmp_runs):
    run_dir = main(["--env", env_name, "train.iterations=2", "eval.every=1", "ppo.batch_instances=16",
                    "ppo.minibatch_instances=8", "ppo.epochs=1", "model.embed_dim=32", "model.n_layers=1",
                    "model.n_heads=4", "model.ff_dim=64", "run.progress=false", "run.tensorboard=false",
                    f"run.root={tmp_runs}"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "eval/gap_pct" in records[-1] and records[-1]["eval/gap_pct"] > 0
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "curves.png").is_file()


@pytest.mark.parametrize("env_name", ["tsp20", "cvrp20"])
def test_evaluate_writes_tour_picture(env_name, tmp_runs, capsys):
    run_dir = main(["--env", env_name, "train.iterations=1", "eval.every=0", "ppo.batch_instances=8",
                    "ppo.minibatch_instances=8", "ppo.epochs=1", "model.embed_dim=16", "model.n_layers=1",
                    "model.n_heads=2", "model.ff_dim=32", "run.progress=false", "run.tensorboard=false",
                    f"run.root={tmp_runs}"])
    capsys.readouterr()
    main(["--evaluate", str(run_dir), "eval.augment=2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["augment"] == 2 and printed["gap_pct"] > 0
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
