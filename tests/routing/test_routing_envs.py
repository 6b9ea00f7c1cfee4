"""TSP / CVRP envs: exact tour lengths, masks, rewards, specs, dev-set replay, errors."""
import itertools
import math

import pytest
import torch
from torchrl.envs.utils import check_env_specs, step_mdp

from envs.routing import CVRPEnv, InvalidActionError, TSPEnv, load_dev_set, load_npz, tour_length


def _run(env, actions):
    """Feeds ``actions [B, T]`` (finished rows get their no-op); returns final td and reward sum."""
    td = env.reset()
    total = torch.zeros(env.batch_size[0], 1)
    for t in range(actions.shape[1]):
        a = torch.where(td["done"].squeeze(1), td["current_node"].squeeze(1).clamp_min(0), actions[:, t])
        td["action"] = a
        td = env.step(td)
        total += td["next", "reward"]
        td = td["next"]
    return td, total


def _dist(p, q):
    return math.dist(p, q)


@pytest.mark.parametrize("n", [3, 5, 7])
def test_tsp_tour_length_and_optimum_vs_brute_force(n):
    g = torch.Generator().manual_seed(n)
    locs = torch.rand(1, n, 2, generator=g)
    perms = torch.tensor(list(itertools.permutations(range(n))))
    env = TSPEnv(instances={"locs": locs.expand(len(perms), n, 2).clone()})
    td, total = _run(env, perms)
    assert td["done"].all()
    pts = locs[0].double().tolist()
    brute = [sum(_dist(pts[p[i]], pts[p[(i + 1) % n]]) for i in range(n)) for p in perms.tolist()]
    assert torch.allclose(td["tour_length"].squeeze(1), torch.tensor(brute, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(-total.squeeze(1).double(), torch.tensor(brute, dtype=torch.float64), atol=1e-5)
    assert td["tour_length"].min().item() == pytest.approx(min(brute), abs=1e-12)


def _cvrp_brute_force(depot, locs, demand, capacity):
    """Every customer order x every way of cutting it into routes; returns (sequences, lengths)."""
    n = len(locs)
    pts = [depot] + locs
    seqs, lengths = [], []
    for perm in itertools.permutations(range(1, n + 1)):
        for cuts in itertools.product([False, True], repeat=n - 1):
            routes, route = [], [perm[0]]
            for cut, node in zip(cuts, perm[1:]):
                if cut:
                    routes.append(route)
                    route = []
                route.append(node)
            routes.append(route)
            if any(sum(demand[c - 1] for c in r) > capacity for r in routes):
                continue
            seq = [c for r in routes for c in r + [0]]
            length = sum(_dist(pts[a], pts[b]) for a, b in zip([0] + seq[:-1], seq))
            seqs.append(seq)
            lengths.append(length)
    return seqs, lengths


@pytest.mark.parametrize("n", [3, 5, 6])
def test_cvrp_tour_length_and_optimum_vs_brute_force(n):
    g = torch.Generator().manual_seed(100 + n)
    depot = torch.rand(2, generator=g)
    locs = torch.rand(n, 2, generator=g)
    demand = torch.randint(1, 6, (n,), generator=g)
    capacity = 10
    seqs, lengths = _cvrp_brute_force(depot.double().tolist(), locs.double().tolist(), demand.tolist(), capacity)
    T = max(map(len, seqs))
    actions = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    B = len(seqs)
    env = CVRPEnv(instances={"depot": depot.expand(B, 2), "locs": locs.expand(B, n, 2),
                             "demand": demand.expand(B, n).float(), "capacity": torch.full((B,), 10.0)})
    td, total = _run(env, actions)
    assert td["done"].all()
    expected = torch.tensor(lengths, dtype=torch.float64)
    assert torch.allclose(td["tour_length"].squeeze(1), expected, atol=1e-12)
    assert torch.allclose(-total.squeeze(1).double(), expected, atol=1e-5)


def _random_episode(env, seed, max_steps=200):
    """Uniformly random legal moves until every instance is done (no auto-reset)."""
    g = torch.Generator().manual_seed(seed)
    td = env.reset()
    steps = []
    for _ in range(max_steps):
        mask = td["action_mask"]
        assert mask.any(-1).all(), "an instance has no legal move"
        td["action"] = torch.multinomial(mask.float(), 1, generator=g).squeeze(1)
        td = env.step(td)
        steps.append(td.clone())
        td = step_mdp(td)
        if td["done"].all():
            return torch.stack(steps, 1)
    raise AssertionError("episodes did not finish")


def test_masks_hold_under_1000_random_episodes():
    tsp = TSPEnv(num_nodes=10, batch_size=1000, seed=1)
    data = _random_episode(tsp, seed=0)
    assert data.shape == (1000, 10) and data["next", "done"][:, -1].all()
    assert all(len(set(row)) == 10 for row in data["action"].tolist())  # a permutation: no revisits
    cvrp = CVRPEnv(num_customers=10, batch_size=1000, capacity=15, seed=2)
    data = _random_episode(cvrp, seed=1)
    assert (data["next", "remaining_capacity"] >= -1e-6).all()  # never over capacity
    done = data["next", "done"].squeeze(-1)
    first_done = done.float().argmax(1).tolist()
    for row, end in zip(data["action"].tolist(), first_done):
        moves = row[: end + 1]
        assert sorted(a for a in moves if a > 0) == list(range(1, 11))  # each customer exactly once
        assert moves[-1] == 0  # back at the depot
        assert all(not (a == 0 and b == 0) for a, b in zip(moves, moves[1:]))  # no depot -> depot


@pytest.mark.parametrize("make", [lambda m: TSPEnv(num_nodes=8, batch_size=16, reward_mode=m, seed=3),
                                  lambda m: CVRPEnv(num_customers=8, batch_size=16, reward_mode=m, capacity=12, seed=3)])
def test_sparse_and_dense_rewards_sum_to_the_same_tour_length(make):
    dense = _random_episode(make("dense"), seed=5)
    sparse = _random_episode(make("sparse"), seed=5)
    assert torch.equal(dense["action"], sparse["action"])
    length = dense["next", "tour_length"][:, -1].squeeze(-1)
    assert torch.allclose(-dense["next", "reward"].sum((1, 2)).double(), length, atol=1e-5)
    assert torch.allclose(-sparse["next", "reward"].sum((1, 2)).double(), length, atol=1e-5)
    assert ((sparse["next", "reward"] != 0).sum((1, 2)) == 1).all()  # sparse: one reward, at the end


def test_check_env_specs_both_envs():
    check_env_specs(TSPEnv(num_nodes=6, batch_size=4))
    check_env_specs(CVRPEnv(num_customers=6, batch_size=4, capacity=10))


def test_dev_set_reference_solutions_replay_to_ref_cost():
    for name in ("tsp20", "tsp50"):  # the dev sets bundled in envs/data
        d = load_dev_set(name, "tsp")
        td, _ = _run(TSPEnv(instances={"locs": d["locs"]}), d["ref_tour"])
        assert td["done"].all()
        assert (td["tour_length"].squeeze(1) - d["ref_cost"]).abs().max() < 1e-5
        assert (tour_length(d["locs"], d["ref_tour"]) - d["ref_cost"]).abs().max() < 1e-5
    for name in ("cvrp20", "cvrp50"):
        d = load_dev_set(name, "cvrp")
        env = CVRPEnv(instances={k: d[k] for k in ("depot", "locs", "demand", "capacity")})
        td, _ = _run(env, d["ref_actions"])
        assert td["done"].all()
        assert (td["tour_length"].squeeze(1) - d["ref_cost"]).abs().max() < 1e-5


def test_invalid_action_names_the_instance():
    env = TSPEnv(num_nodes=5, batch_size=3)
    td = env.reset()
    td["action"] = torch.tensor([0, 1, 2])
    td = env.step(td)["next"]
    td["action"] = torch.tensor([3, 1, 4])  # instance 1 revisits node 1
    with pytest.raises(InvalidActionError, match="instance 1 took node 1"):
        env.step(td)
    cvrp = CVRPEnv(num_customers=4, batch_size=2, capacity=10)
    td = cvrp.reset()
    td["action"] = torch.tensor([0, 1])  # depot -> depot is masked
    with pytest.raises(InvalidActionError, match="instance 0 took node 0"):
        cvrp.step(td)
    td["action"] = torch.tensor([1, 9])
    with pytest.raises(InvalidActionError, match="out of range"):
        cvrp.step(td)


def test_invalid_instances_fail_at_construction():
    locs = torch.rand(2, 5, 2)
    locs[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite coordinates in instance\(s\) \[1\]"):
        TSPEnv(instances={"locs": locs})
    with pytest.raises(ValueError, match="shape"):
        TSPEnv(instances={"locs": torch.rand(2, 5, 3)})
    good = {"depot": torch.rand(2, 2), "locs": torch.rand(2, 4, 2), "demand": torch.ones(2, 4), "capacity": torch.tensor(5.0)}
    CVRPEnv(instances=good)
    with pytest.raises(ValueError, match=r"failing instance\(s\): \[0\]"):
        CVRPEnv(instances={**good, "demand": torch.tensor([[1.0, 6.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])})
    with pytest.raises(ValueError, match="demand must have shape"):
        CVRPEnv(instances={**good, "demand": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="miss"):
        CVRPEnv(instances={"locs": good["locs"]})
    with pytest.raises(FileNotFoundError):
        load_npz("/nonexistent/tsp.npz")


def test_finished_rows_always_have_one_legal_move():
    env = TSPEnv(num_nodes=4, batch_size=2)
    data = env.rollout(6, break_when_any_done=False, auto_reset=True)
    assert (data["action_mask"].sum(-1) >= 1).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_instance_repeats_give_groups_of_the_same_instance(symmetric):
    env = CVRPEnv(num_customers=6, batch_size=12, capacity=10, seed=1, instance_repeats=4, symmetric_repeats=symmetric)
    td = env.reset()
    locs = td["locs"]  # depot first
    dist = torch.cdist(locs, locs)
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        assert torch.equal(td["demand"][rows], td["demand"][4 * g].expand(4, -1))
        assert torch.allclose(dist[rows], dist[4 * g].expand(4, -1, -1), atol=1e-6)  # same instance up to symmetry
        assert torch.equal(locs[rows][1], locs[4 * g]) != symmetric  # copies moved only when symmetric
    assert not torch.allclose(dist[0], dist[4])  # different groups, different instances
    # the same action sequence gives the same tour length within a group
    actions = torch.arange(1, 7).repeat(12, 1)
    actions = torch.stack([actions, torch.zeros_like(actions)], -1).reshape(12, -1)  # depot after every customer
    td, _ = _run(env, actions)
    length = td["tour_length"].view(3, 4)
    assert torch.allclose(length, length[:, :1].expand(-1, 4), atol=1e-5)


def test_instance_repeats_must_divide_the_batch_and_need_generated_instances():
    with pytest.raises(ValueError, match="divide batch_size"):
        TSPEnv(num_nodes=5, batch_size=10, instance_repeats=4)
    with pytest.raises(ValueError, match="generated instances"):
        TSPEnv(instances={"locs": torch.rand(4, 5, 2)}, instance_repeats=2)
