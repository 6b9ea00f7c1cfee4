"""``optim.ema_decay`` in the single-agent Dreamer recipe: a weight average that evaluations play,
while training (and the last iterate's evaluations) stay exactly those of a run without it."""
import json

import pytest
import torch

from recipes import dreamer
from torchrl_dreamer.checkpoint import averaged_weights, weight_average
from torchrl_dreamer.config import ConfigError

from helpers import DREAMER_TINY

RUN = ["--env", "cartpole", *DREAMER_TINY, "train.env_steps=96", "eval.every=32", "env.max_episode_steps=30",
       "eval.episodes=3", "eval.confirm_episodes=3"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals(run_dir, key):
    return [row[key] for row in metrics(run_dir) if key in row]


def test_weight_average_and_averaged_weights():
    net = torch.nn.Linear(2, 1)
    assert weight_average(net, 0.0) is None
    avg = weight_average(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    avg.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net.weight.fill_(3.0)
    avg.update_parameters(net)  # then 0.5 * old + 0.5 * new
    assert torch.allclose(avg.module.weight, torch.full_like(net.weight, 2.0))
    state = {"agent": net.state_dict(), "ema": avg.state_dict()}
    assert torch.equal(averaged_weights(state)["weight"], avg.module.weight)
    plain = {"agent": net.state_dict(), "ema": None}
    assert averaged_weights(plain) is plain["agent"]


@pytest.mark.smoke
def test_dreamer_weight_average_leaves_training_alone_and_is_what_evaluations_play(tmp_runs):
    plain = dreamer.main([*RUN, f"run.root={tmp_runs}/plain"])
    avg = dreamer.main([*RUN, f"run.root={tmp_runs}/avg", "optim.ema_decay=0.9"])
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (plain, avg))
    # the same training: the last iterate's weights, and its evaluations, repeat the plain run's
    assert a["ema"] is None and b["ema"] is not None
    assert all(torch.equal(a["agent"][k], b["agent"][k]) for k in a["agent"])
    assert evals(avg, "eval/episode_reward_sum_last") == evals(plain, "eval/episode_reward_sum")
    assert evals(avg, "eval/episode_length_last") == evals(plain, "eval/episode_length")
    assert len(evals(avg, "eval/episode_reward_sum")) == len(evals(plain, "eval/episode_reward_sum")) >= 3
    # the average is not the last iterate, and it is what --evaluate and best.pt hold
    average = averaged_weights(b)
    assert any(not torch.equal(average[k], b["agent"][k]) for k in average if average[k].is_floating_point())
    best = torch.load(avg / "best.pt", weights_only=False)
    assert best["eval/episode_reward_sum"] == max(evals(avg, "eval/episode_reward_sum"))
    # the end-of-run score: final = the average, final_last = the last iterate, which equals the plain
    # run's final weights on the same fresh episodes
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (plain, avg))
    assert rb["final_last"]["episode_reward_sum"] == ra["final"]["episode_reward_sum"]
    assert rb["use"] in ("checkpoint.pt", "best.pt") and "final_last" not in ra
    out = dreamer.main(["--evaluate", str(avg), "eval.episodes=2"])
    assert out is not None


@pytest.mark.smoke
def test_dreamer_weight_average_resumes(tmp_runs):
    run_dir = dreamer.main([*RUN, f"run.root={tmp_runs}/r", "optim.ema_decay=0.9", "train.env_steps=64"])
    first = torch.load(run_dir / "checkpoint.pt", weights_only=False)["ema"]
    dreamer.main(["--resume", str(run_dir), "train.env_steps=96"])
    second = torch.load(run_dir / "checkpoint.pt", weights_only=False)["ema"]
    assert int(second["n_averaged"]) > int(first["n_averaged"]) > 0
    assert evals(run_dir, "eval/episode_reward_sum_last")


def test_ema_decay_out_of_range_is_a_config_error(tmp_runs):
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        dreamer.main([*RUN, f"run.root={tmp_runs}/bad", "optim.ema_decay=1.0"])
