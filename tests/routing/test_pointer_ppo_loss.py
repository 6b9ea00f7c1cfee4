"""PointerPPOLoss, the routing PPO loss as a TorchRL ``LossModule``: bit-identical to the free
function it replaced (a copy of that code is kept below as the naive reference), equal to TorchRL's
``ClipPPOLoss`` on the flattened learnable steps, keys renamed by ``set_keys``, input left alone,
``state_dict`` round trip. The generic loss contract (tests/contract.py) runs on it too
(tests/mappo/test_mappo_loss_contract.py)."""
import copy

import pytest
import torch

from baselines.pointer_ppo import (PointerPPOLoss, compute_advantage, compute_shared_advantage, encode_groups,
                                   multistart_nodes, ppo_minibatch_loss, ppo_routing_update, rollout, step_groups)
from envs.routing import CVRPEnv, TSPEnv
from torchrl_dreamer.pointer import PointerActorCritic

TINY = dict(embed_dim=16, n_layers=1, n_heads=2, ff_dim=16)
KW = dict(clip_epsilon=0.2, entropy_coef=0.01, critic_coef=0.5)
K, B, N = 4, 8, 5  # rollouts per instance (multi-start), rollouts, nodes / customers
DIAGNOSTICS = ("entropy", "clip_fraction", "kl_approx")


def reference_minibatch_loss(model, mb, *, clip_epsilon, entropy_coef, critic_coef, normalize_advantage=True,
                             group_size=1, first_move_coef=0.0, instance_group=0):
    """The free function ``ppo_minibatch_loss`` as it was before ``PointerPPOLoss`` (verbatim ops)."""
    K = group_size
    G = instance_group or K
    if G % K:
        raise ValueError(f"instance_group {G} must be a multiple of group_size {K}")
    locs = mb["locs"][:, 0]
    demand = mb["demand"][:, 0] if model.problem == "cvrp" else None
    cache = encode_groups(model, locs, demand, K)
    cap = mb["remaining_capacity"] if model.problem == "cvrp" else None
    log_probs, value = step_groups(model, cache, K, mb["current_node"], mb["first_node"], cap, mb["action_mask"])
    new_lp = log_probs.gather(-1, mb["action"].unsqueeze(-1)).squeeze(-1)
    learn = mb["active"] & ~mb["forced"] if "forced" in mb.keys() else mb["active"]
    active = learn.float()
    n_active = active.sum().clamp_min(1)
    adv = mb["advantage"]
    if normalize_advantage:
        mean = (adv * active).sum() / n_active
        std = (((adv - mean) ** 2 * active).sum() / n_active).sqrt().clamp_min(1e-8)
        adv = (adv - mean) / std
    log_ratio = (new_lp - mb["log_prob"]) * active
    ratio = log_ratio.exp()
    gain = torch.minimum(ratio * adv, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * adv)
    entropy = -(log_probs.exp() * log_probs.masked_fill(~mb["action_mask"], 0.0)).sum(-1)
    losses = {
        "objective": -(gain * active).sum() / n_active,
        "critic": critic_coef * (((value.squeeze(-1) - mb["value_target"]) ** 2) * active).sum() / n_active,
        "entropy": -entropy_coef * (entropy * active).sum() / n_active,
    }
    if first_move_coef > 0 and G > 1 and "forced" in mb.keys() and bool(mb["forced"][:, 0].all()):
        episode = (mb["reward"] * mb["active"].float()).sum(1).view(-1, G)
        best = episode.argmax(1) + torch.arange(episode.shape[0], device=episode.device) * G
        target = mb["action"][best, 0].repeat_interleave(G // K)
        losses["first_move"] = -first_move_coef * log_probs[::K, 0].gather(-1, target[:, None]).mean()
    with torch.no_grad():
        stats = {
            "diag/entropy": (entropy * active).sum() / n_active,
            "diag/clip_fraction": (((ratio - 1).abs() > clip_epsilon).float() * active).sum() / n_active,
            "diag/kl_approx": (((ratio - 1) - log_ratio) * active).sum() / n_active,
        }
    return losses, stats


# case -> (problem, multi-start, symmetric rollouts); the loss options each case needs come from _options
CASES = {"tsp": ("tsp", False, False), "cvrp": ("cvrp", False, False), "tsp_multistart": ("tsp", True, False),
         "cvrp_multistart": ("cvrp", True, False), "cvrp_multistart_symmetric": ("cvrp", True, True)}


def _options(case, first_move_coef=0.05):
    _, multistart, symmetric = CASES[case]
    if not multistart:
        return {}
    return dict(group_size=1 if symmetric else K, instance_group=K, first_move_coef=first_move_coef)


def _model(problem, seed=0):
    torch.manual_seed(seed)
    return PointerActorCritic(problem, **TINY)


def _batch(case, seed=0):
    """``(model, batch)``: a rollout batch with advantages, and the policy moved afterwards so that
    ratios leave the clip range (as after a few PPO steps)."""
    problem, multistart, symmetric = CASES[case]
    model = _model(problem, seed)
    repeats = dict(instance_repeats=K, symmetric_repeats=symmetric) if multistart else {}
    env = (TSPEnv(num_nodes=N, batch_size=B, seed=4, **repeats) if problem == "tsp"
           else CVRPEnv(num_customers=N, batch_size=B, capacity=10, seed=4, **repeats))
    torch.manual_seed(1)
    if multistart:
        batch = rollout(env, model, first_nodes=multistart_nodes(problem, N, B, K),
                        group_size=1 if symmetric else K)
        compute_shared_advantage(batch, K)
    else:
        batch = rollout(env, model)
        compute_advantage(batch, 1.0, 0.95)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, batch


def _grads(model, total):
    params = list(model.parameters())
    return torch.autograd.grad(total, params, allow_unused=True)


def _assert_same_grads(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("normalize_advantage", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_module_is_bit_identical_to_the_free_function(case, normalize_advantage):
    """Same values (loss terms and diagnostics) and same parameter gradients, bit for bit, as the
    free function it replaced; ``ppo_minibatch_loss`` (now a wrapper) too."""
    model, batch = _batch(case)
    opts = dict(KW, normalize_advantage=normalize_advantage, **_options(case))
    ref_losses, ref_stats = reference_minibatch_loss(model, batch, **opts)
    loss = PointerPPOLoss(model, **opts)
    out = loss(batch)
    terms = {"objective", "critic", "entropy"} | ({"first_move"} if opts.get("first_move_coef") else set())
    assert set(ref_losses) == terms
    assert out.batch_size == torch.Size([]) and set(out.keys()) == {f"loss_{t}" for t in terms} | set(DIAGNOSTICS)
    for t in terms:
        assert torch.equal(out[f"loss_{t}"], ref_losses[t]), t
        assert out[f"loss_{t}"].requires_grad
    for d in DIAGNOSTICS:
        assert torch.equal(out[d], ref_stats[f"diag/{d}"]), d
        assert not out[d].requires_grad
    # the total in the order ppo_routing_update sums it, then each term alone
    total = sum(out[f"loss_{t}"] for t in ref_losses)
    _assert_same_grads(_grads(model, total), _grads(model, sum(ref_losses.values())))
    for t in terms:
        _assert_same_grads(_grads(model, loss(batch)[f"loss_{t}"]),
                           _grads(model, reference_minibatch_loss(model, batch, **opts)[0][t]))
    wrapped, wrapped_stats = ppo_minibatch_loss(model, batch, **opts)
    assert list(wrapped) == list(ref_losses) and list(wrapped_stats) == list(ref_stats)
    assert all(torch.equal(wrapped[t], ref_losses[t]) for t in terms)
    assert all(torch.equal(wrapped_stats[d], ref_stats[d]) for d in ref_stats)


@pytest.mark.parametrize("case", ["tsp", "cvrp_multistart"])
def test_ppo_routing_update_matches_the_loop_on_the_free_function(case):
    """``ppo_routing_update`` (one ``PointerPPOLoss`` per call) takes the same optimizer steps and
    reports the same metrics, bit for bit, as the minibatch loop on the free function did."""
    model, batch = _batch(case)
    opts = dict(KW, **_options(case))
    G = opts.get("instance_group", 1)
    runs = []
    for use_module in (True, False):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        torch.manual_seed(5)
        if use_module:
            stats = ppo_routing_update(m, batch, opt, epochs=2, minibatch_instances=B // 2, max_grad_norm=0.5, **opts)
        else:
            totals, n = {}, 0
            for _ in range(2):
                perm = (torch.randperm(B // G)[:, None] * G + torch.arange(G)).reshape(-1)
                for start in range(0, B - B // 2 + 1, B // 2):
                    losses, diag = reference_minibatch_loss(m, batch[perm[start:start + B // 2]], **opts)
                    total = sum(losses.values())
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(list(m.parameters()), 0.5)
                    opt.step()
                    for k, v in {**{f"loss/{k}": v for k, v in losses.items()}, **diag,
                                 "diag/grad_norm": grad_norm}.items():
                        totals[k] = totals.get(k, 0.0) + v.detach()
                    n += 1
            stats = {k: float(v) / n for k, v in totals.items()}
        runs.append((stats, m.state_dict()))
    (stats, state), (ref_stats, ref_state) = runs
    assert stats == ref_stats
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


@pytest.mark.parametrize("case", ["tsp", "cvrp", "tsp_multistart"])
def test_loss_module_equals_torchrl_clip_ppo_loss(case):
    """The per-episode loss (encoder once per episode or instance, inactive and forced steps masked)
    equals TorchRL's ClipPPOLoss on the flattened learnable steps: objective, l2 critic, entropy,
    gradients."""
    from tensordict.nn import TensorDictModule
    from torchrl.modules import MaskedCategorical, ProbabilisticActor
    from torchrl.objectives import ClipPPOLoss

    problem = CASES[case][0]
    model, batch = _batch(case)
    ours = PointerPPOLoss(model, normalize_advantage=False, **KW, **_options(case, first_move_coef=0.0))(batch)
    assert ours["clip_fraction"] > 0.05
    assert "loss_first_move" not in ours.keys()

    flat = batch[batch["active"] & ~batch["forced"]]  # [M] learnable steps, each with its own copy of the instance
    assert flat.shape[0] < batch["active"].sum() or not CASES[case][1]  # multi-start: forced steps left out
    for key in ("advantage", "value_target"):  # TorchRL's layout: batch shape + (1,)
        flat[key] = flat[key].unsqueeze(-1)

    def heads(locs, demand, cur, first, cap, mask):
        cache = model.encode(locs, demand if problem == "cvrp" else None)
        log_probs, value = model.step(cache, cur, first, cap if problem == "cvrp" else None, mask)
        return log_probs.masked_fill(~mask, 0.0), value  # MaskedCategorical re-applies the mask

    if problem == "tsp":
        flat["demand"] = torch.zeros(flat.shape[0], N)
        flat["remaining_capacity"] = torch.zeros(flat.shape[0], 1)
    in_keys = ["locs", "demand", "current_node", "first_node", "remaining_capacity", "action_mask"]
    actor = ProbabilisticActor(
        TensorDictModule(lambda *a: heads(*a)[0], in_keys=in_keys, out_keys=["logits"]),
        in_keys={"logits": "logits", "mask": "action_mask"}, distribution_class=MaskedCategorical,
        return_log_prob=True)
    critic = TensorDictModule(lambda *a: heads(*a)[1], in_keys=in_keys, out_keys=["state_value"])
    ref = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_coeff=0.01, critic_coeff=0.5, loss_critic_type="l2",
                      normalize_advantage=False)
    ref.set_keys(sample_log_prob="log_prob")
    theirs = ref(flat.clone())
    assert ours["loss_objective"].item() == pytest.approx(theirs["loss_objective"].item(), abs=1e-5)
    assert ours["loss_critic"].item() == pytest.approx(theirs["loss_critic"].item(), rel=1e-5)
    assert ours["loss_entropy"].item() == pytest.approx(theirs["loss_entropy"].item(), rel=1e-5)
    g_ours = _grads(model, ours["loss_objective"] + ours["loss_critic"])
    g_theirs = _grads(model, theirs["loss_objective"] + theirs["loss_critic"])
    for a, b in zip(g_ours, g_theirs):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("case", ["tsp", "cvrp_multistart"])
def test_set_keys_renames_what_is_read(case):
    """``set_keys(advantage="my_adv")`` reads ``my_adv`` (the input has no ``advantage`` at all),
    and the same for the collection log-prob and the first-move term's reward."""
    model, batch = _batch(case)
    opts = dict(KW, **_options(case))
    expected = PointerPPOLoss(model, **opts)(batch)
    renamed = {"advantage": "my_adv", "sample_log_prob": "my_log_prob", "reward": ("my", "reward")}
    moved = batch.clone()
    for field, new in renamed.items():
        old = getattr(PointerPPOLoss.default_keys(), field)
        moved.set(new, moved.pop(old))
    loss = PointerPPOLoss(model, **opts)
    loss.set_keys(advantage="my_adv")
    assert loss.tensor_keys.advantage == "my_adv"
    assert PointerPPOLoss(model, **opts).tensor_keys.advantage == "advantage"  # per instance
    loss.set_keys(sample_log_prob="my_log_prob", reward=("my", "reward"))
    out = loss(moved)
    assert set(out.keys()) == set(expected.keys())
    assert all(torch.equal(out[k], expected[k]) for k in expected.keys())
    with pytest.raises(KeyError, match="needs 'advantage'|needs 'log_prob'"):
        PointerPPOLoss(model, **opts)(moved)  # the default keys are gone from this input
    loss.set_keys(advantage=None)  # back to the default
    assert loss.tensor_keys.advantage == "advantage"


@pytest.mark.parametrize("case", ["cvrp", "cvrp_multistart"])
def test_forward_and_backward_leave_the_input_alone(case):
    model, batch = _batch(case)
    before = {k: v.clone() for k, v in batch.items(include_nested=True, leaves_only=True)}
    out = PointerPPOLoss(model, **KW, **_options(case))(batch)
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    after = dict(batch.items(include_nested=True, leaves_only=True))
    assert after.keys() == before.keys() and batch.batch_size == torch.Size([B, batch.shape[1]])
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def test_state_dict_round_trip():
    """The loss's state is the model's (keys ``model.*``); loading it into a loss around another
    model gives the same outputs, bit for bit."""
    model, batch = _batch("cvrp_multistart")
    opts = dict(KW, **_options("cvrp_multistart"))
    used = PointerPPOLoss(model, **opts)
    expected = used(batch)
    state = copy.deepcopy(used.state_dict())
    assert list(state) == [f"model.{k}" for k in model.state_dict()]
    fresh = PointerPPOLoss(_model("cvrp", seed=1), **opts)
    assert not torch.equal(fresh(batch)["loss_objective"], expected["loss_objective"])
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    out = fresh(batch)
    assert all(torch.equal(out[k], expected[k]) for k in expected.keys())
