"""DreamerV3 recurrent state-space model on plain tensors.

Latent-state names used across the package:

| name | symbol | shape | meaning |
|---|---|---|---|
| ``deter`` | h (belief) | ``[B, D]`` | deterministic block-GRU state |
| ``stoch`` | z (state) | ``[B, G, C]`` | one-hot sample of ``G`` categoricals with ``C`` classes |
| ``posterior_logits`` | q(z | h, x) | ``[B, G, C]`` | from h and the observation embedding |
| ``prior_logits`` | p(z | h) | ``[B, G, C]`` | from h alone (used in imagination) |

Both distributions get 1% unimix; samples are straight-through one-hots (value one-hot, gradient
of the probabilities). ``is_first`` resets h, z and the previous action to the learned initial
state (h = tanh(w), z = mode of the prior at that h, previous action 0).

Speed (the scan over time is inherently sequential): everything that does not
depend on the recurrent state is computed for all time steps *before* the loop (the observation
part of the posterior input layer, the action part of the GRU input layer, the Gumbel noise of
the samples, the reset masks), and the prior is computed for all steps *after* it, since nothing
inside the loop needs it. Inside the loop only the recurrent matmuls remain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "BiasLinear", "BlockGRU", "RSSM", "gumbel_noise", "exponential_noise"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x * rsqrt(mean(x^2) + eps) * scale, one dispatch instead of six (~10% faster on CPU)
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)


def _add_bias(product: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``product + bias``; under ``torch.compile`` written as ``product - (-bias)`` (exact), which
    inductor leaves as a matmul plus an add fused into the consumer kernel. ``mm + bias`` is
    pattern-matched into ``addmm``, which on CPU first copies the broadcast bias into the output:
    an extra pass and dispatch per layer (~200 copies per compiled update at the benchmark sizes)."""
    if torch.compiler.is_compiling():
        return torch.sub(product, -bias)
    return product + bias


class BiasLinear(nn.Linear):
    """``nn.Linear`` (same parameters and ``state_dict``) whose bias is added by the consumer
    kernel when compiled (see :func:`_add_bias`); eager it is ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None or not torch.compiler.is_compiling():
            return super().forward(x)
        return _add_bias(torch.matmul(x, self.weight.t()), self.bias)


def exponential_noise(shape, device=None, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard exponential noise ``E = -log(u)``: ``argmax(probs / E)`` is a sample of
    ``Categorical(probs)`` (the exponential race; with the same ``u`` it picks exactly what
    Gumbel-max ``argmax(log probs + gumbel)`` picks, since ``gumbel = -log(E)``)."""
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return -torch.log(u.clamp(1e-20, 1.0 - 1e-7))


def gumbel_noise(shape, device=None, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise: ``argmax(logits + noise)`` is a sample of ``Categorical(logits)``."""
    return -torch.log(exponential_noise(shape, device, dtype, generator))


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """``tanh``; compiled as ``2 sigmoid(2x) - 1`` (within 3e-7): inductor's vectorised tanh on
    this CPU (AVX2) costs several exps, and the GRU's candidate is the largest elementwise cost of a
    compiled RSSM step (one compiled 128-row GRU step: 604 -> 435 us)."""
    if torch.compiler.is_compiling():
        return 2 * torch.sigmoid(2 * x) - 1
    return torch.tanh(x)


class BlockGRU(nn.Module):
    """DreamerV3's GRU: the input goes through ``Linear -> RMSNorm -> SiLU`` (``hidden`` units);
    the state is split into ``blocks`` groups, each gated by a block-diagonal map of its own
    slice of h plus the whole input; gates are normalised, the update gate has a -1 bias.

    The input layer is split in two (``z`` part and action part) so the action part can be
    computed for a whole sequence at once (:meth:`action_input`)."""

    def __init__(self, stoch_flat: int, action_dim: int, deter: int, hidden: int, blocks: int = 8) -> None:
        super().__init__()
        if deter % blocks:
            raise ValueError(f"deter ({deter}) must divide into {blocks} blocks")
        self.deter, self.hidden, self.blocks = deter, hidden, blocks
        self.z_in = nn.Linear(stoch_flat, hidden, bias=False)
        self.a_in = nn.Linear(action_dim, hidden, bias=False)
        self.in_norm = RMSNorm(hidden)
        per = deter // blocks
        # block-diagonal recurrent weights and a dense input weight, each block -> 3 gates x per
        self.w_h = nn.Parameter(torch.randn(blocks, per, 3 * per) * per**-0.5)
        self.w_x = nn.Parameter(torch.randn(hidden, blocks * 3 * per) * hidden**-0.5)
        self.bias = nn.Parameter(torch.zeros(blocks * 3 * per))
        self.gate_norm = RMSNorm(3 * per)

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        return self.a_in(action)

    def forward(self, h: torch.Tensor, z_flat: torch.Tensor, action_in: torch.Tensor) -> torch.Tensor:
        """``h [B, D]``, ``z_flat [B, G*C]``, ``action_in [B, hidden]`` (from :meth:`action_input`)."""
        B = h.shape[0]
        per = self.deter // self.blocks
        x = F.silu(self.in_norm(self.z_in(z_flat) + action_in))
        rec = torch.bmm(h.reshape(B, self.blocks, per).transpose(0, 1), self.w_h).transpose(0, 1)  # [B, g, 3per]
        if torch.compiler.is_compiling():
            x_in = _add_bias(x @ self.w_x, self.bias)
        else:
            x_in = torch.addmm(self.bias, x, self.w_x)
        gates = rec + x_in.reshape(B, self.blocks, 3 * per)
        gates = self.gate_norm(gates)
        reset, cand, update = gates.chunk(3, -1)  # per block: its own gates
        cand = _tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        h_blocks = h.reshape(B, self.blocks, per)
        return (h_blocks + update * (cand - h_blocks)).reshape(B, self.deter)


class RSSM(nn.Module):
    """Observe (posterior) and imagine (prior) steps on plain tensors.

    Args:
        action_dim: size of the (one-hot or continuous) action vector.
        embed_dim: size of the observation embedding from the encoder.
        deter, stoch, classes, hidden, blocks: sizes (``stoch`` = G categoricals of ``classes``).
        unimix: uniform mixing of the latent distributions.
    """

    def __init__(self, action_dim: int, embed_dim: int, deter: int = 512, stoch: int = 32, classes: int = 16,
                 hidden: int = 256, blocks: int = 8, unimix: float = 0.01) -> None:
        super().__init__()
        self.action_dim, self.embed_dim = action_dim, embed_dim
        self.deter, self.stoch, self.classes, self.unimix = deter, stoch, classes, unimix
        self.gru = BlockGRU(stoch * classes, action_dim, deter, hidden, blocks)
        self.init_deter = nn.Parameter(torch.zeros(deter))
        self.prior_net = nn.Sequential(nn.Linear(deter, hidden, bias=False), RMSNorm(hidden), nn.SiLU(),
                                       BiasLinear(hidden, stoch * classes))
        # posterior input layer split into its h part and its embedding part (precomputed per sequence)
        self.post_h = nn.Linear(deter, hidden, bias=False)
        self.post_e = nn.Linear(embed_dim, hidden, bias=False)
        self.post_out = nn.Sequential(RMSNorm(hidden), nn.SiLU(), BiasLinear(hidden, stoch * classes))
        self._compiled_step = None
        self._compiled_scan = None

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    @staticmethod
    def features(deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        """``[..., D]``, ``[..., G, C]`` -> ``[..., D + G*C]`` (input of every head and the actor)."""
        return torch.cat([deter, stoch.flatten(-2)], -1)

    def initial(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned initial state: ``h = tanh(w)``, ``z`` = mode of the prior at that h."""
        h = torch.tanh(self.init_deter).unsqueeze(0)
        z = F.one_hot(self.prior_logits(h).argmax(-1), self.classes).to(h.dtype)
        h, z = h.expand(batch, self.deter), z.expand(batch, self.stoch, self.classes)
        if device is not None:
            h, z = h.to(device), z.to(device)
        return h, z

    def _probs(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw net output ``[..., G*C]`` -> unimixed probabilities ``[..., G, C]``."""
        probs = torch.softmax(raw.reshape(*raw.shape[:-1], self.stoch, self.classes), -1)
        return (1 - self.unimix) * probs + self.unimix / self.classes

    def _logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw net output ``[..., G*C]`` -> unimixed log-probabilities ``[..., G, C]``."""
        return self._probs(raw).log()

    def prior_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._logits(self.prior_net(h))

    def prior_sample(self, h: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One-hot sample ``[..., G, C]`` of the unimixed prior at ``h``, imagination's sampler,
        drawn as the mixture it is: with probability ``unimix`` a uniform class, otherwise
        Gumbel-max on the raw prior logits (``argmax(raw + gumbel)`` samples ``softmax(raw)``
        exactly, with no softmax, max or normalisation). ``noise``: ``(gumbel [..., G, C], mix
        [..., G])`` (standard Gumbel and uniform [0, 1)), e.g. pre-drawn by
        :func:`~.imagination.draw_noise`; the mix uniform picks the branch and, below ``unimix``,
        the class (``floor(mix / unimix * C)``, uniform given the branch). The same distribution
        as :meth:`sample` on :meth:`prior_logits` (tested), and no transcendental per latent in
        the step: with 4 classes the softmax was the largest elementwise cost of a compiled
        imagination step after the GRU. Under autograd the straight-through term of the unimixed
        probabilities is added (value unchanged, gradient reaches the prior net)."""
        raw = self.prior_net(h)
        raw = raw.reshape(*raw.shape[:-1], self.stoch, self.classes)
        if noise is None:
            noise = (gumbel_noise(raw.shape, raw.device, raw.dtype),
                     torch.rand(raw.shape[:-1], device=raw.device, dtype=raw.dtype))
        gumbel, mix = noise
        index = (raw.detach() + gumbel).argmax(-1)
        if self.unimix > 0:
            uniform = (mix * (self.classes / self.unimix)).long().clamp_max(self.classes - 1)
            index = torch.where(mix < self.unimix, uniform, index)
        hard = (index.unsqueeze(-1) == torch.arange(self.classes, device=h.device)).to(raw.dtype)
        if raw.requires_grad:
            probs = (1 - self.unimix) * torch.softmax(raw, -1) + self.unimix / self.classes
            return hard + probs - probs.detach()
        return hard

    def posterior_logits(self, h: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        return self._logits(self.post_out(self.post_h(h) + self.post_e(embed)))

    def sample(self, logits: torch.Tensor, noise: torch.Tensor | None = None, deterministic: bool = False) -> torch.Tensor:
        """Straight-through one-hot sample ``[..., G, C]`` (Gumbel-max; ``noise`` may be
        precomputed with :func:`gumbel_noise`). ``deterministic`` takes the mode."""
        if deterministic:
            index = logits.argmax(-1)
        else:
            if noise is None:
                noise = gumbel_noise(logits.shape, logits.device, logits.dtype)
            index = (logits.detach() + noise).argmax(-1)
        hard = torch.zeros_like(logits).scatter_(-1, index.unsqueeze(-1), 1.0)
        probs = logits.exp()
        return hard + probs - probs.detach()

    def reset_where_first(self, h, z, prev_action, is_first):
        """Replaces the state by the initial one where ``is_first [B]`` is True."""
        if not bool(is_first.any()):
            return h, z, prev_action
        h0, z0 = self.initial(h.shape[0], h.device)
        m = is_first.reshape(-1, 1).to(h.dtype)
        h = h + m * (h0 - h)
        z = z + m.unsqueeze(-1) * (z0 - z)
        prev_action = (1 - m) * prev_action
        return h, z, prev_action

    def img_step(self, h: torch.Tensor, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Next deterministic state from ``(h [B, D], z [B, G, C], action [B, A])``."""
        return self.gru(h, z.flatten(-2), self.gru.action_input(action))

    def obs_step(self, h, z, prev_action, embed, is_first, deterministic: bool = False):
        """One filtering step (acting): reset where ``is_first``, advance h, sample z from the
        posterior. Returns ``(h, z, posterior_logits)``."""
        h, z, prev_action = self.reset_where_first(h, z, prev_action, is_first)
        h = self.img_step(h, z, prev_action)
        post = self.posterior_logits(h, embed)
        return h, self.sample(post, deterministic=deterministic), post

    def _observe_step(self, h, z, action_in, post_embed, noise):
        """One posterior step of the scan (the part that depends on the recurrent state)."""
        h = self.gru(h, z.flatten(-2), action_in)
        post = self._logits(self.post_out(self.post_h(h) + post_embed))
        return h, self.sample(post, noise), post

    @property
    def _step_fn(self):
        return self._compiled_step if self._compiled_step is not None else self._observe_step

    def enable_compile(self, mode: str = "step", **kwargs) -> None:
        """``torch.compile`` the posterior scan (forward and backward); optional, measure first.

        ``mode="step"``: the per-step function (compiles in seconds, modest gain). ``mode="scan"``:
        the whole loop over time as one graph, with the ``is_first`` resets applied as masks on
        every step (no data-dependent branch, so one graph serves every reset pattern); compile
        time grows with the sequence length (~1 min at T = 16 on one core)."""
        if mode == "step":
            self._compiled_step = torch.compile(self._observe_step, dynamic=False, **kwargs)
        elif mode == "scan":
            self._compiled_scan = torch.compile(self._scan, dynamic=False, **kwargs)
        else:
            raise ValueError(f"compile mode must be 'step' or 'scan', got '{mode}'")

    def _scan(self, h, z, h0, z0, first, action_in, post_embed, noise, resets=None, step_fn=None):
        """The posterior loop. ``resets`` (list of bools, eager path): apply the ``is_first`` reset
        only at steps where some row starts an episode; ``None`` (compiled path): apply it as a
        mask at every step, so one graph serves every reset pattern."""
        step_fn = step_fn or self._observe_step
        deters, stochs, posts = [], [], []
        for t in range(post_embed.shape[1]):
            if resets is None or resets[t]:
                m = first[:, t]
                h = h + m * (h0 - h)
                z = z + m.unsqueeze(-1) * (z0 - z)
            h, z, post = step_fn(h, z, action_in[:, t], post_embed[:, t], noise[:, t])
            deters.append(h)
            stochs.append(z)
            posts.append(post)
        return torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(posts, 1)

    def observe(self, embed: torch.Tensor, prev_action: torch.Tensor, is_first: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor] | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Posterior scan over time.

        Args:
            embed: ``[B, T, E]`` observation embeddings.
            prev_action: ``[B, T, A]``: the action taken *before* step t (zeroed where is_first).
            is_first: ``[B, T]`` bool: step t starts an episode (state and previous action reset).
            state: ``(h, z)`` before step 0, or ``None`` for the initial state.
            noise: standard Gumbel noise ``[B, T, G, C]`` of the posterior samples (drawn here
                when ``None``), e.g. drawn eagerly by a caller that compiles this call.

        Returns ``deter [B, T, D]``, ``stoch``/``posterior_logits``/``prior_logits`` ``[B, T, G, C]``.
        """
        B, T = embed.shape[:2]
        h0, z0 = self.initial(B, embed.device)
        h, z = (h0, z0) if state is None else state
        first = is_first.to(embed.dtype).unsqueeze(-1)  # [B, T, 1]
        action_in = self.gru.action_input(prev_action) * (1 - first)  # previous action reset at is_first
        post_embed = self.post_e(embed)
        if noise is None:
            noise = gumbel_noise((B, T, self.stoch, self.classes), embed.device, embed.dtype)
        if torch.compiler.is_compiling():  # traced inside a larger compiled graph: the masked scan
            deter, stoch, post = self._scan(h, z, h0, z0, first, action_in, post_embed, noise)
        elif self._compiled_scan is not None:
            deter, stoch, post = self._compiled_scan(h, z, h0, z0, first, action_in, post_embed, noise)
        else:
            resets = is_first.any(0).tolist()  # one host sync for the whole sequence
            deter, stoch, post = self._scan(h, z, h0, z0, first, action_in, post_embed, noise, resets, self._step_fn)
        return {"deter": deter, "stoch": stoch, "posterior_logits": post, "prior_logits": self.prior_logits(deter)}
