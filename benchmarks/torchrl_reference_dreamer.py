"""Reference timing of TorchRL 0.14's *built-in* DreamerV3 learner (CartPole-sized vectors).

Builds the DreamerV3 stack entirely from TorchRL's own pieces and times one complete gradient
update on a fixed random replay batch ``[batch, seq_len]``, so that ``torchrl_dreamer``'s own
implementation can be compared against it at equal sizes::

    python benchmarks/torchrl_reference_dreamer.py                 # phased + stepper timing
    python benchmarks/torchrl_reference_dreamer.py --check         # optimizer vs reference; phased == stepper
    python benchmarks/torchrl_reference_dreamer.py --config torchrl_defaults    # TorchRL's own defaults
    python benchmarks/torchrl_reference_dreamer.py --deter 512 --hidden 64 ...   # other sizes

What is TorchRL's (nothing here re-implements a network or a loss):

* world model: ``symlog`` -> ``DreamerV3MLP`` encoder, ``RSSMRolloutV3`` over ``RSSMPriorV3``
  (``recurrent_model="block_gru"``: the grouped DreamerV3 core, 8 blocks, 2 prior layers) and
  ``RSSMPosteriorV3`` (``use_rms_norm=True``), ``DreamerV3MLP`` decoder (+ ``symexp``: the loss
  symlogs both sides), ``DreamerV3MLP`` reward head (255 bins, ``SymExpTwoHot``) and continue head;
* imagination: ``DreamerEnv`` over a ``WorldModelWrapper`` sharing the prior and reward head,
  ``DreamerV3DiscreteActor`` (one-hot actions), two-hot ``DreamerV3MLP`` critic;
* losses: ``DreamerV3ModelLoss`` / ``DreamerV3ActorLoss`` / ``DreamerV3ValueLoss`` composed by
  ``DreamerV3Loss`` (which adds the 0.3-weighted replay-value loss), slow critic via
  ``SoftUpdate(tau=0.02)``; optimizer ``torchrl.trainers.algorithms.DreamerV3Optimizer``;
  update driver ``DreamerV3OptimizationStepper`` (eager on CPU).

Two ways to run the same update (``build_torchrl_update(mode=...)``):

* ``"phased"`` (default): the body of ``DreamerV3Loss.forward`` + ``DreamerV3OptimizationStepper``
  written out in phases so it can be timed per phase. The three loss graphs reach disjoint sets
  of parameters through disjoint graphs (imagination starts from detached posteriors with the world
  model held out, the actor loss only reaches the actor, the critic sees detached imagined states;
  the replay-value loss shares the world-model graph and is backpropagated with it), so three
  ``backward`` calls give the same gradients as one on the sum; and ``DreamerV3Optimizer`` is
  strictly per-tensor (AGC, RMS, momentum; the step counters advance in lockstep), so three
  instances (world model / actor / critic) make the same update as one. ``--check`` verifies both
  claims numerically against the stepper (bit-identical on this machine).
* ``"stepper"``: exactly ``DreamerV3OptimizationStepper.step`` on ``DreamerV3Loss``; only the
  forwards can be told apart there (timed by wrapping the loss ``forward`` methods and
  ``DreamerEnv.rollout``), backward + optimizer step + slow-critic EMA are one lump.

Default sizes (``RefSizes``): deter 192, 16 x 4 latents, hidden/units 32, 3-layer MLPs everywhere
(a scaled-down reference "size1m": classes 4, 3 layers) give 136,613 parameters (~137k).

Parameter count: unique trainable parameters the optimizer updates = world model (encoder, RSSM,
decoder, reward and continue heads) + actor + online critic. The slow critic is a buffer copy
(``target_value_model_params``) and is not counted; shared modules (prior and reward head inside
the imagination env) are counted once.

TorchRL 0.14.1 DreamerV3 defaults vs the DreamerV3 reference (paper arXiv:2301.04104 and the
author's code, danijar/dreamerv3 ``configs.yaml`` / ``embodied/jax/opt.py``). ``config="reference"``
(default) overrides every "differs" row so the timed update does the reference's work;
``config="torchrl_defaults"`` keeps TorchRL's defaults (cheaper and different, see the report).

Differs (TorchRL default -> reference; file:line in site-packages/torchrl):

* KL form: ``DreamerV3ModelLoss(kl_mode="balanced")`` (objectives/dreamer_v3.py:376) is DreamerV2
  KL balancing, ``0.8 * KL(sg(q)||p) + 0.2 * KL(q||sg(p))``, with ``lambda_kl=1``. Reference: two
  separate terms, dyn 1.0 / rep 0.1 in the code's ``loss_scales`` (the v1 paper text says dyn 0.5 /
  rep 0.1). ``kl_mode="separate"`` gives dyn 1.0 / rep 0.1 (``lambda_dynamic`` /
  ``lambda_representation``); set ``lambda_dynamic=0.5`` for the v1-paper value.
* free bits: in balanced mode the 1-nat clamp is applied to *each* categorical's KL, then averaged
  (``categorical_kl_balanced``, objectives/dreamer_v3.py:182), i.e. a threshold of G nats on the
  sum, applied per categorical. Reference: 1 nat on the KL summed over the G categoricals (what
  ``categorical_kl_terms`` / ``kl_mode="separate"`` does).
* unimix 1 %: ``unimix=0.0`` by default in the KL (``DreamerV3ModelLoss``, :379), in the RSSM
  prior/posterior samples (``RSSMPriorV3`` / ``RSSMPosteriorV3``, modules/models/model_based.py:1720,
  :1939). (``DreamerV3DiscreteActor`` does default to 1 % unimix and 0.01 output scale.)
* recurrent core: ``RSSMPriorV3(recurrent_model="gru")`` (model_based.py:1715) is an ``nn.GRUCell``
  behind Linear-SiLU projections, no norm; the reference block GRU (8 blocks, RMSNorm, update bias
  -1, 2-layer prior head) is ``recurrent_model="block_gru"``.
* posterior: ``RSSMPosteriorV3(use_rms_norm=False)`` (model_based.py:1936): Linear-SiLU-Linear;
  reference Linear-RMSNorm-SiLU-Linear.
* continue predictor: ``DreamerV3ModelLoss(lambda_continue=0.0)`` (:375) and
  ``DreamerV3ActorLoss(continuation_model=None)``: no continue loss and no termination in
  imagination. Reference: con loss 1.0 with target ``0.997 * (1 - terminal)`` (contdisc), which
  also carries the discount.
* discount: TDLambda estimator default ``gamma=0.99`` (objectives/utils.py ``default_value_kwargs``)
  and ``DreamerV3ValueLoss(gamma=0.99)`` (:1166, used when no ``actor_loss=``). Reference
  1 - 1/333 = 0.997 (here: gamma 1.0 with the discount in the continuation, as contdisc=True).
* actor gradient: ``DreamerV3ActorLoss(use_reinforce=False)`` (:752) backpropagates the lambda
  return through the world model. Reference: REINFORCE with ``sg(advantage)`` (all action spaces in
  the current code; discrete actions already in the paper).
* critic: ``DreamerV3ValueLoss(value_loss="symlog_mse")`` (:1164), scalar output. Reference: two-hot
  cross-entropy over 255 symexp bins.
* slow critic: ``slow_critic_regularization=0.0`` (:1169): no slow critic. Reference: EMA with rate
  0.02 every update and regulariser weight 1.0 (``SoftUpdate(tau=0.02)`` must be added by hand;
  ``SoftUpdate``'s own legacy default is eps 0.999 = tau 0.001).
* zero-init output layers of the reward and critic heads: ``DreamerV3MLP(outscale=1.0)``
  (model_based.py:1156); reference outscale 0.0.
* ``DreamerV3ModelLoss(detach_output=True)`` (:388) is incompatible with ``DreamerV3Loss``'s own
  default replay-value weight 0.3 (``ValueError``, :1622): the defaults do not compose.

Same as the reference: lambda 0.95; entropy 3e-4 (``entropy_bonus``); imagination horizon 15;
return normalisation (EMA rate 0.01 of the 5th/95th percentiles, divide advantages by
``max(1, P95 - P5)``, no debiasing: ``PercentileValueNorm``); reward head two-hot over 255 bins,
``symexp(linspace(-20, 20))`` support; replay-value loss 0.3 with horizon 333 and lambda 0.95
(``DreamerV3Loss``); symlog reconstruction summed over features; ``DreamerV3Optimizer`` defaults
(LaProp-style: per-tensor AGC 0.3 with pmin 1e-3, RMS beta2 0.999 with eps 1e-20 and bias
correction, momentum 0.9 on the normalised gradient with bias correction, lr 4e-5, linear warm-up
from 0 over 1000 updates, one optimizer for all modules) -- ``--check`` compares it step by step
with the optax chain of the reference.

Layout difference, not an option: TorchRL's replay layout encodes ``("next", "observation")`` only
(the first observation of an episode is never encoded unless the replay shifts records), and each
chunk starts from zeros with ``is_init`` instead of the reference's stored ``replay_context``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, fields
from typing import Callable

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.data import Composite, OneHot, Unbounded
from torchrl.envs.model_based.dreamer import DreamerEnv
from torchrl.modules import (
    DreamerV3DiscreteActor,
    DreamerV3MLP,
    RSSMPosteriorV3,
    RSSMPriorV3,
    RSSMRolloutV3,
    SymExpTwoHot,
    WorldModelWrapper,
)
from torchrl.objectives import (
    DreamerV3ActorLoss,
    DreamerV3Loss,
    DreamerV3ModelLoss,
    DreamerV3ValueLoss,
    SoftUpdate,
    symexp,
    symlog,
)
from torchrl.objectives.utils import ValueEstimators
from torchrl.trainers.algorithms import DreamerV3OptimizationStepper, DreamerV3Optimizer

__all__ = ["RefSizes", "build_torchrl_update", "count_parameters"]

# reference values (danijar/dreamerv3 configs.yaml), used to override TorchRL's defaults
HORIZON_333 = 333.0           # discount 1 - 1/333 = 0.997, encoded in the continue target
LAMBDA = 0.95
UNIMIX = 0.01
FREE_NATS = 1.0
REPLAY_VALUE_WEIGHT = 0.3
SLOW_CRITIC_TAU = 0.02


@dataclass
class RefSizes:
    obs_dim: int = 4          # vector observation (CartPole)
    action_dim: int = 2       # discrete, one-hot actions
    deter: int = 192          # RSSM deterministic state (block-GRU belief), 24 per block
    stoch: int = 16           # number of categoricals G
    classes: int = 4          # classes per categorical C (reference size1m: 4)
    hidden: int = 32          # RSSM hidden / MLP units
    mlp_layers: int = 3       # layers in encoder/decoder/heads/actor/critic MLPs (reference: 3)
    bins: int = 255
    batch: int = 8            # sequences per update
    seq_len: int = 16
    horizon: int = 15         # imagination horizon
    blocks: int = 8           # block-GRU groups (reference: 8)
    head_layers: int = 0      # reward/continue head layers; 0 -> mlp_layers (reference uses 1)


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------


class _Stack:
    """All modules of one learner, with handles used for counting and phased updates.

    ``config="reference"`` overrides the TorchRL defaults that differ from the DreamerV3 reference
    (see the module docstring); ``config="torchrl_defaults"`` keeps every TorchRL default that has
    one (only the sizes, the one-hot actor, the 255-bin reward head and ``detach_output=False``,
    which ``DreamerV3Loss``'s default replay-value loss requires, are chosen here).
    """

    def __init__(self, sizes: RefSizes, seed: int, config: str = "reference") -> None:
        if config not in ("reference", "torchrl_defaults"):
            raise ValueError(f"config must be 'reference' or 'torchrl_defaults', got {config!r}")
        ref = config == "reference"
        torch.manual_seed(seed)
        s = sizes
        state_dim = s.stoch * s.classes
        feat = state_dim + s.deter
        head_layers = s.head_layers or s.mlp_layers
        self.sizes, self.state_dim, self.config = s, state_dim, config
        # reference overrides; {} keeps TorchRL's default
        unimix = {"unimix": UNIMIX} if ref else {}

        # ---- world model ------------------------------------------------------------------
        self.encoder_net = DreamerV3MLP(s.obs_dim, None, depth=s.mlp_layers, num_cells=s.hidden)
        encoder = TensorDictSequential(
            TensorDictModule(symlog, in_keys=[("next", "observation")], out_keys=[("next", "symlog_obs")]),
            # the posterior's fast path reads ("next", "encoded_latents")
            TensorDictModule(self.encoder_net, in_keys=[("next", "symlog_obs")],
                             out_keys=[("next", "encoded_latents")]),
        )
        self.prior_net = RSSMPriorV3(
            action_shape=(s.action_dim,), action_dim=s.action_dim, hidden_dim=s.hidden,
            rnn_hidden_dim=s.deter, num_categoricals=s.stoch, num_classes=s.classes,
            # default "gru": nn.GRUCell behind a Linear-SiLU projection (TorchRL's older core)
            **(dict(recurrent_model="block_gru", num_blocks=s.blocks, num_layers=1, prior_num_layers=2)
               if ref else {}),
            **unimix,
        )
        self.posterior_net = RSSMPosteriorV3(
            hidden_dim=s.hidden, num_categoricals=s.stoch, num_classes=s.classes,
            rnn_hidden_dim=s.deter, obs_embed_dim=s.hidden,
            **(dict(use_rms_norm=True, num_layers=1) if ref else {}),
            **unimix,
        )
        rollout = RSSMRolloutV3(
            TensorDictModule(self.prior_net, in_keys=["state", "belief", "action"],
                             out_keys=[("next", "prior_logits"), ("next", "state"), ("next", "belief")]),
            TensorDictModule(self.posterior_net, in_keys=[("next", "belief"), ("next", "encoded_latents")],
                             out_keys=[("next", "posterior_logits"), ("next", "state")]),
            reset_key="is_init",
        )
        assert rollout._fast_path, "standard key wiring -> TorchRL's tensor path"
        self.decoder_net = DreamerV3MLP(feat, s.obs_dim, depth=s.mlp_layers, num_cells=s.hidden)
        decoder = TensorDictSequential(
            TensorDictModule(self.decoder_net, in_keys=[("next", "state"), ("next", "belief")],
                             out_keys=[("next", "reco_symlog")]),
            # the model loss symlogs target *and* prediction, so predict in raw space
            TensorDictModule(symexp, in_keys=[("next", "reco_symlog")], out_keys=[("next", "reco_pixels")]),
        )
        # reference: zero-initialised output layers of the reward and critic heads
        outscale = {"outscale": 0.0} if ref else {}
        self.reward_net = DreamerV3MLP(feat, s.bins, depth=head_layers, num_cells=s.hidden, **outscale)
        self.reward_decoder = SymExpTwoHot(s.bins)
        reward_head = TensorDictSequential(
            TensorDictModule(self.reward_net, in_keys=[("next", "state"), ("next", "belief")],
                             out_keys=[("next", "reward_logits")]),
            TensorDictModule(self.reward_decoder, in_keys=[("next", "reward_logits")],
                             out_keys=[("next", "reward")]),
        )
        wm_parts = [encoder, rollout, decoder, reward_head]
        continuation_model = None
        self.continue_net = None
        if ref:  # TorchRL: lambda_continue=0.0 and continuation_model=None by default
            self.continue_net = DreamerV3MLP(feat, 1, depth=head_layers, num_cells=s.hidden)
            wm_parts.append(TensorDictModule(self.continue_net, in_keys=[("next", "state"), ("next", "belief")],
                                             out_keys=[("next", "continue_pred")]))
            continuation_model = TensorDictSequential(
                TensorDictModule(self.continue_net, in_keys=["state", "belief"], out_keys=["continue_logits"]),
                TensorDictModule(torch.sigmoid, in_keys=["continue_logits"], out_keys=["continuation"]),
            )
        self.world_model = TensorDictSequential(*wm_parts)

        # ---- imagination env: shares the prior and the reward head ---------------------------
        imagination = WorldModelWrapper(
            TensorDictModule(self.prior_net, in_keys=["state", "belief", "action"],
                             out_keys=["_", "state", "belief"]),
            TensorDictSequential(
                TensorDictModule(self.reward_net, in_keys=["state", "belief"], out_keys=["reward_logits"]),
                TensorDictModule(self.reward_decoder, in_keys=["reward_logits"], out_keys=["reward"]),
            ),
        )
        self.mb_env = DreamerEnv(imagination, prior_shape=(state_dim,), belief_shape=(s.deter,))
        self.mb_env.observation_spec = Composite(state=Unbounded(state_dim), belief=Unbounded(s.deter))
        self.mb_env.state_spec = self.mb_env.observation_spec.clone()
        self.mb_env.action_spec = OneHot(s.action_dim)
        self.mb_env.reward_spec = Unbounded((1,))

        # ---- actor and critic ----------------------------------------------------------------
        self.actor = DreamerV3DiscreteActor(feat, s.action_dim, depth=s.mlp_layers, num_cells=s.hidden)
        if ref:  # two-hot critic (TorchRL default value_loss="symlog_mse": one scalar output)
            self.critic_net = DreamerV3MLP(feat, s.bins, depth=s.mlp_layers, num_cells=s.hidden, **outscale)
            self.critic = TensorDictSequential(
                TensorDictModule(self.critic_net, in_keys=["state", "belief"], out_keys=["state_value_logits"]),
                TensorDictModule(SymExpTwoHot(s.bins), in_keys=["state_value_logits"], out_keys=["state_value"]),
            )
        else:
            self.critic_net = DreamerV3MLP(feat, 1, depth=s.mlp_layers, num_cells=s.hidden)
            self.critic = TensorDictModule(self.critic_net, in_keys=["state", "belief"], out_keys=["state_value"])

        # ---- losses ------------------------------------------------------------------------
        model_kwargs = dict(
            kl_mode="separate",          # default "balanced" (DreamerV2 KL balancing, alpha 0.8)
            lambda_dynamic=1.0, lambda_representation=0.1, free_bits=FREE_NATS,
            lambda_continue=1.0,         # default 0.0 (continue loss off)
            continue_target_scale=1 - 1 / HORIZON_333,
            global_average=False,        # sum over obs dims, mean over batch/time (reference)
            **unimix,
        ) if ref else {}
        self.model_loss = DreamerV3ModelLoss(
            self.world_model, num_reward_bins=s.bins,
            detach_output=False,         # required by DreamerV3Loss's replay-value loss (weight 0.3)
            **model_kwargs,
        )
        self.model_loss.set_keys(pixels="observation")
        self.actor_loss = DreamerV3ActorLoss(
            self.actor, self.critic, self.mb_env,
            continuation_model=continuation_model,
            imagination_horizon=s.horizon,
            **({"use_reinforce": True} if ref else {}),   # default False: backprop through the model
        )
        if ref:
            # discount lives in the continuation (0.997 * (1 - terminal)), so gamma = 1 like the
            # reference's contdisc=True; TorchRL's default TDLambda is gamma 0.99, lambda 0.95
            self.actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=1.0, lmbda=LAMBDA)
        self.value_loss = DreamerV3ValueLoss(
            self.critic, actor_loss=self.actor_loss,
            **(dict(value_loss="two_hot", num_value_bins=s.bins,
                    slow_critic_regularization=1.0) if ref else {}),   # default 0.0: no slow critic
        )
        self.target_updater = SoftUpdate(self.value_loss, tau=SLOW_CRITIC_TAU) if ref else None
        self.loss = DreamerV3Loss(self.model_loss, self.actor_loss, self.value_loss,
                                  replay_value_loss_weight=REPLAY_VALUE_WEIGHT,
                                  continuation_horizon=HORIZON_333, lmbda=LAMBDA)

        # ---- parameter groups (unique tensors) ------------------------------------------------
        self.wm_params = _unique(self.world_model.parameters())
        self.actor_params = _unique(self.actor.parameters())
        self.critic_params = _unique(self.critic.parameters())
        all_ids = {id(p) for p in self.wm_params + self.actor_params + self.critic_params}
        loss_ids = {id(p) for p in self.loss.parameters()}
        assert all_ids == loss_ids and len(all_ids) == sum(
            map(len, (self.wm_params, self.actor_params, self.critic_params))), "groups must partition"

        self.sample = _make_batch(s, state_dim, seed)


def _unique(params) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in _unique(module.parameters()))


def count_parameters(stack: _Stack) -> dict[str, int]:
    """Per-component trainable parameter counts (slow critic excluded, shared modules once)."""
    counts = {
        "encoder": _numel(stack.encoder_net),
        "rssm_prior": _numel(stack.prior_net),   # recurrent core + prior head
        "rssm_posterior": _numel(stack.posterior_net),
        "decoder": _numel(stack.decoder_net),
        "reward_head": _numel(stack.reward_net),
        "continue_head": _numel(stack.continue_net) if stack.continue_net is not None else 0,
    }
    parts = sum(counts.values())
    counts["world_model"] = sum(p.numel() for p in stack.wm_params)
    assert counts["world_model"] == parts, "world-model parts must add up"
    counts["actor"] = sum(p.numel() for p in stack.actor_params)
    counts["critic"] = sum(p.numel() for p in stack.critic_params)
    counts["total"] = counts["world_model"] + counts["actor"] + counts["critic"]
    return counts


def _make_batch(s: RefSizes, state_dim: int, seed: int) -> TensorDict:
    """Fixed CartPole-like replay batch in TorchRL's layout: ``action`` at t leads to ``next`` at t."""
    g = torch.Generator().manual_seed(seed + 1)
    B, T = s.batch, s.seq_len
    action = torch.nn.functional.one_hot(torch.randint(s.action_dim, (B, T), generator=g), s.action_dim).float()
    is_init = torch.zeros(B, T, 1, dtype=torch.bool)
    is_init[:, 0] = True
    terminated = torch.zeros(B, T, 1, dtype=torch.bool)
    # half of the sequences cross an episode end in the middle: terminal, then a new episode
    half, mid = B // 2, T // 2
    terminated[:half, mid - 1] = True
    is_init[:half, mid] = True
    return TensorDict(
        {
            "state": torch.zeros(B, T, state_dim),   # initial latent (is_init zeroes it anyway)
            "belief": torch.zeros(B, T, s.deter),
            "action": action,
            "is_init": is_init,
            "next": {
                "observation": torch.randn(B, T, s.obs_dim, generator=g),
                "reward": torch.ones(B, T, 1),       # CartPole: +1 every step
                "done": terminated.clone(),
                "terminated": terminated,
            },
        },
        [B, T],
    )


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------


class _Accum:
    """Wall-clock accumulator that wraps a bound method of an object (instance attribute)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, obj, name: str) -> None:
        method = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        # an instance attribute shadows the method; write __dict__ directly so that
        # nn.Module.__setattr__ does not get involved
        obj.__dict__[name] = timed


def _phased_update_fn(st: _Stack) -> Callable[[], dict[str, float]]:
    """``DreamerV3Loss.forward`` + ``DreamerV3OptimizationStepper.step``, written out in phases.

    Phases (they partition the wall time of one call):
      world_model  = zero_grad, ``DreamerV3ModelLoss`` forward (encoder, RSSM over seq_len,
                     decoder, reward/continue heads, KL/reco/reward/continue losses), backward of
                     (model losses + 0.3 * replay-value loss) -- one pass through the world-model
                     graph, the replay-value critic part included -- and the world-model step;
      imagination  = time inside ``DreamerEnv.rollout`` (``horizon`` prior steps, actor sampling,
                     reward head, TorchRL env bookkeeping) called by ``DreamerV3ActorLoss``;
      actor_critic = the rest of ``DreamerV3ActorLoss`` (critic + continuation on imagined states,
                     lambda returns, return normalisation, log-prob/entropy), actor backward + step,
                     ``DreamerV3ValueLoss`` on imagined states and its replay-value forward, critic
                     backward, critic step and the slow-critic ``SoftUpdate``.
    """
    opt_wm = DreamerV3Optimizer(st.wm_params)
    opt_actor = DreamerV3Optimizer(st.actor_params)
    opt_critic = DreamerV3Optimizer(st.critic_params)
    st.optimizers = (opt_wm, opt_actor, opt_critic)
    rollout_timer = _Accum()
    rollout_timer.wrap(st.mb_env, "rollout")
    loss, ml, al, vl = st.loss, st.model_loss, st.actor_loss, st.value_loss
    sample = st.sample

    def update() -> dict[str, float]:
        rollout_timer.seconds = 0.0
        t0 = time.perf_counter()
        for opt in st.optimizers:
            opt.zero_grad(set_to_none=False)
        # --- world-model forward (as in DreamerV3Loss.forward)
        model_losses, posterior = ml(sample)
        t1 = time.perf_counter()
        state = posterior.get(("next", "state"))
        belief = posterior.get(("next", "belief"))
        actor_input = TensorDict(
            {"state": state.detach().reshape(-1, state.shape[-1]),
             "belief": belief.detach().reshape(-1, belief.shape[-1])},
            [sample.numel()],
        )
        actor_losses, imagined = al(actor_input)
        actor_losses["loss_actor"].backward()
        opt_actor.step()
        value_losses, _ = vl(imagined.detach())
        replay = posterior.get("next").select(*vl.value_model.in_keys)
        replay.set(vl.tensor_keys.bootstrap,
                   imagined.get("lambda_target")[..., 0, 0].reshape(sample.batch_size))
        replay.set("next", sample.get("next").select("reward", "done", "terminated"))
        replay_value = vl.replay_value_loss(replay, horizon=loss.continuation_horizon,
                                            lmbda=loss.lmbda)["loss_replay_value"]
        value_losses["loss_value"].backward()
        t2 = time.perf_counter()
        # --- world-model backward (+ replay-value path) and step
        wm_total = sum(v.squeeze() for k, v in model_losses.items() if k.startswith("loss_"))
        (wm_total + loss.replay_value_loss_weight * replay_value).backward()
        opt_wm.step()
        t3 = time.perf_counter()
        opt_critic.step()
        if st.target_updater is not None:
            st.target_updater.step()
        t4 = time.perf_counter()
        imag = rollout_timer.seconds
        return {
            "world_model": (t1 - t0) + (t3 - t2),
            "imagination": imag,
            "actor_critic": (t2 - t1) - imag + (t4 - t3),
        }

    return update


def _stepper_update_fn(st: _Stack) -> Callable[[], dict[str, float]]:
    """Exactly TorchRL's ``DreamerV3OptimizationStepper.step`` (eager), one optimizer.

    Only forwards can be split here: world_model = ``DreamerV3ModelLoss`` forward, imagination =
    ``DreamerEnv.rollout``, actor_critic = rest of the actor-loss forward + value-loss forward +
    replay-value forward, backward_step = everything else (one backward over the summed loss,
    ``DreamerV3Optimizer.step``, ``SoftUpdate.step``, sample preparation).
    """
    optimizer = DreamerV3Optimizer(_unique(st.loss.parameters()))
    st.optimizers = (optimizer,)
    stepper = DreamerV3OptimizationStepper(st.loss, optimizer, st.target_updater,
                                           compile_train_step=False, cudagraph=False)
    timers = {k: _Accum() for k in ("model", "actor", "rollout", "value", "replay")}
    timers["model"].wrap(st.model_loss, "forward")
    timers["actor"].wrap(st.actor_loss, "forward")
    timers["rollout"].wrap(st.mb_env, "rollout")
    timers["value"].wrap(st.value_loss, "forward")
    timers["replay"].wrap(st.value_loss, "replay_value_loss")
    sample = st.sample

    def update() -> dict[str, float]:
        for t in timers.values():
            t.seconds = 0.0
        t0 = time.perf_counter()
        stepper.step(None, sample)
        total = time.perf_counter() - t0
        sec = {k: t.seconds for k, t in timers.items()}
        out = {
            "world_model": sec["model"],
            "imagination": sec["rollout"],
            "actor_critic": sec["actor"] - sec["rollout"] + sec["value"] + sec["replay"],
        }
        out["backward_step"] = total - sum(out.values())
        return out

    return update


def build_torchrl_update(sizes: RefSizes, seed: int = 0, mode: str = "phased",
                         config: str = "reference") -> tuple[Callable[[], dict[str, float]], int]:
    """Returns (update_fn, n_params). Each call of update_fn runs ONE complete DreamerV3 update with
    TorchRL's own modules/losses on a fixed random batch [batch, seq_len] (obs, one-hot action,
    reward, is_init, terminated/done): world-model loss forward+backward+optimizer step,
    imagination rollout from the posterior states for ``horizon`` steps, actor loss + step, value
    loss (imagined + replay) + step, slow-critic EMA.

    It returns a dict of seconds per phase, ``{"world_model", "imagination", "actor_critic"}``
    (see :func:`_phased_update_fn` for exactly what each covers; the three sum to the call's wall
    time). ``mode="stepper"`` runs ``DreamerV3OptimizationStepper.step`` instead and adds a
    ``"backward_step"`` entry (its backward/optimizer cannot be split per phase).

    ``config="reference"`` (default) sets the TorchRL options that differ from the DreamerV3
    reference to the reference values; ``config="torchrl_defaults"`` keeps TorchRL's defaults
    (different work per update and a different parameter count, see the module docstring).

    ``update_fn.stack`` holds the modules and ``update_fn.param_counts`` the per-component counts.
    """
    stack = _Stack(sizes, seed, config)
    if mode == "phased":
        fn = _phased_update_fn(stack)
    elif mode == "stepper":
        fn = _stepper_update_fn(stack)
    else:
        raise ValueError(f"mode must be 'phased' or 'stepper', got {mode!r}")
    fn.stack = stack
    fn.param_counts = count_parameters(stack)
    return fn, fn.param_counts["total"]


# --------------------------------------------------------------------------------------------
# checks and CLI
# --------------------------------------------------------------------------------------------


def check_equivalence(sizes: RefSizes, seed: int = 0, updates: int = 3, config: str = "reference") -> None:
    """Phased update == TorchRL stepper update: same gradients and same optimizer moments."""
    phased, _ = build_torchrl_update(sizes, seed, "phased", config)
    stepper, _ = build_torchrl_update(sizes, seed, "stepper", config)
    for i in range(updates):
        torch.manual_seed(1000 + i)
        stepper()
        torch.manual_seed(1000 + i)
        phased()
    a, b = stepper.stack, phased.stack
    worst_grad = worst_state = 0.0
    for pa, pb in zip(a.loss.parameters(), b.loss.parameters()):
        assert pa.shape == pb.shape
        scale = pa.grad.abs().max().clamp_min(1e-12)
        worst_grad = max(worst_grad, float((pa.grad - pb.grad).abs().max() / scale))
        sa = a.optimizers[0].state[pa]
        sb = next(o.state[pb] for o in b.optimizers if pb in o.state)
        for key in ("rms", "momentum"):
            s = sa[key].abs().max().clamp_min(1e-30)
            worst_state = max(worst_state, float((sa[key] - sb[key]).abs().max() / s))
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    print(f"check [{config}]: {updates} updates, max rel grad diff {worst_grad:.2e}, "
          f"max rel optimizer-state diff {worst_state:.2e}")
    assert worst_grad < 1e-4 and worst_state < 1e-3, "phased update differs from the stepper"


def check_optimizer(steps: int = 6, warmup: int = 3, seed: int = 0) -> None:
    """``DreamerV3Optimizer`` vs the reference optax chain (danijar/dreamerv3 embodied/jax/opt.py):
    ``clip_by_agc(0.3, pmin=1e-3) -> scale_by_rms(0.999, 1e-20) -> scale_by_momentum(0.9)
    -> scale_by_learning_rate(linear warm-up from 0, then constant)``, written out per tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(sh, generator=g, dtype=torch.float64)) for sh in shapes]
    params.append(torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)))  # ||p|| = 0 -> pmin path
    ref = [p.detach().clone() for p in params]
    nu = [torch.zeros_like(p) for p in ref]
    mu = [torch.zeros_like(p) for p in ref]
    lr, agc, pmin, b1, b2, eps = 4e-2, 0.3, 1e-3, 0.9, 0.999, 1e-20
    opt = DreamerV3Optimizer(params, lr=lr, agc=agc, parameter_norm_min=pmin, beta1=b1, beta2=b2,
                             eps=eps, warmup_steps=warmup)
    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) * 10 ** (step % 3 - 1)
                 for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        count = step - 1                                   # optax schedules see the pre-increment count
        rate = lr * min(1.0, count / warmup)
        for i, (p, u) in enumerate(zip(ref, grads)):
            upper = agc * max(pmin, float(p.norm()))
            u = u / max(1.0, float(u.norm()) / upper)                          # clip_by_agc
            nu[i] = b2 * nu[i] + (1 - b2) * u * u
            u = u / ((nu[i] / (1 - b2 ** step)).sqrt() + eps)                  # scale_by_rms
            mu[i] = b1 * mu[i] + (1 - b1) * u
            ref[i] = p - rate * mu[i] / (1 - b1 ** step)                        # momentum + lr
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    print(f"check optimizer: DreamerV3Optimizer == reference AGC/RMS/momentum/warm-up chain "
          f"({steps} steps, warm-up {warmup})")
    # a tensor whose .grad is None is skipped entirely (trainers/algorithms/dreamer_v3.py, the
    # `if parameter.grad is not None` bucket filter), while the reference always applies the
    # momentum update (a zero gradient still moves the parameter by the decaying momentum)
    params[0].grad = None
    before = params[0].detach().clone()
    for p in params[1:]:
        p.grad = torch.zeros_like(p)
    opt.step()
    print("  note: grad=None tensors are frozen (momentum not applied): "
          f"moved={not torch.equal(before, params[0].detach())}; the reference would move them")


def time_updates(fn: Callable[[], dict[str, float]], warmup: int, updates: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    walls, cpus, phases = [], [], []
    for _ in range(updates):
        c, t = time.process_time(), time.perf_counter()
        phases.append(fn())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    # process CPU time is reported next to wall time: on a shared machine the wall time also
    # counts the time the OS gave to other processes (with 1 thread, CPU ~= wall on an idle core)
    out = {"updates_per_s": updates / sum(walls), "cpu_updates_per_s": updates / sum(cpus),
           "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls)}
    for key in phases[0]:
        out[key] = statistics.mean(p[key] for p in phases)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(RefSizes):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--mode", choices=("phased", "stepper", "both"), default="both")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", choices=("reference", "torchrl_defaults"), default="reference")
    parser.add_argument("--check", action="store_true",
                        help="verify DreamerV3Optimizer vs the reference chain and phased == stepper, then exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = RefSizes(**{f.name: getattr(args, f.name) for f in fields(RefSizes)})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {sizes}")
    if args.check:
        check_optimizer()
        check_equivalence(sizes, args.seed, config=args.config)
        return
    modes = ("phased", "stepper") if args.mode == "both" else (args.mode,)
    for mode in modes:
        fn, n_params = build_torchrl_update(sizes, args.seed, mode, args.config)
        if mode == modes[0]:
            print("parameters:", ", ".join(f"{k} {v:,}" for k, v in fn.param_counts.items()))
        r = time_updates(fn, args.warmup, args.updates)
        stats = ("updates_per_s", "cpu_updates_per_s", "median_s", "min_s", "max_s")
        phase_keys = [k for k in r if k not in stats]
        per = sum(r[k] for k in phase_keys)
        print(f"[{args.config}/{mode}] {r['updates_per_s']:.2f} updates/s wall, "
              f"{r['cpu_updates_per_s']:.2f} per CPU-second  (median {r['median_s'] * 1e3:.0f} ms, "
              f"min {r['min_s'] * 1e3:.0f}, max {r['max_s'] * 1e3:.0f}; {args.updates} timed after "
              f"{args.warmup} warm-up)")
        print(f"[{args.config}/{mode}] phases (mean ms/update, share): " + ", ".join(
            f"{k} {r[k] * 1e3:.0f} ({r[k] / per:.0%})" for k in phase_keys))


if __name__ == "__main__":
    main()
