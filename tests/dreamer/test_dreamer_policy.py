"""The acting policy filters the latent state exactly as the world model does in training."""
import torch
from torchrl.collectors import Collector
from torchrl.envs import TensorDictPrimer
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreamer.dreamer.agent import DreamerPolicy, make_agent, preset
from torchrl_dreamer.dreamer.envs import make_dreamer_env
from torchrl_dreamer.dreamer.replay import SequenceWriter


def _setup(num_envs=2, classes=1):
    torch.manual_seed(0)
    env = make_dreamer_env(factory="scripted_env:make_counting_env", num_envs=num_envs, kwargs={"length": 5})
    # classes=1: every latent sample is the same one-hot, so acting and training are deterministic
    agent = make_agent({"observation": (2,)}, 2, True, preset("tiny", deter=16, hidden=8, units=8, stoch=3,
                                                               classes=classes, blocks=2))
    policy = DreamerPolicy(agent.world_model, agent.actor)
    env.append_transform(TensorDictPrimer(primers=policy.primer_specs(), default_value=0.0, expand_specs=True))
    return env, agent, policy


def test_acting_state_equals_training_posterior_across_resets():
    env, agent, policy = _setup()
    collector = Collector(env, policy, frames_per_batch=2 * 13, total_frames=-1, auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    assert batch["next", "done"].sum() >= 4  # several episodes, partial resets
    rows = SequenceWriter({"observation": "observation"}, policy.from_env_action, 2)(batch)
    for stream in range(2):
        r = rows[rows["stream"] == stream]
        with torch.no_grad():
            out = agent.world_model.observe({"observation": r["observation"][None]}, r["action"][None], r["is_first"][None])
        acting = batch[stream]["next", "deter"]
        assert torch.allclose(out["deter"][0][~r["is_last"]], acting, atol=1e-6)


def test_mode_actions_and_random_prefill():
    env, agent, policy = _setup(num_envs=1, classes=1)  # deterministic latent: same state, same mode
    td = env.reset()
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        a1 = policy(td.clone())["action"]
        a2 = policy(td.clone())["action"]
    assert a1.sum() == 1 and torch.equal(a1, a2)
    policy.random_actions = True
    seen = {int(policy(td.clone())["action"].argmax()) for _ in range(40)}
    assert seen == {0, 1}
