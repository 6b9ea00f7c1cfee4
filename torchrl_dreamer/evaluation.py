"""``--evaluate`` output that loses nothing: the numbers are printed and saved before any picture.

Every recipe's ``evaluate_checkpoint`` computes its numbers, then :func:`report_evaluation` prints
them as one JSON line and writes the same record to ``<run dir>/eval.json`` (temporary file +
``os.replace``: readers never see half a file), and only then are pictures drawn, each through
:func:`draw_picture`. A run directory that cannot be written (read-only mount, someone else's
files, a full disk) costs the files, never the numbers: each skipped file gets a one-line note on
stderr saying what was skipped and why, and no traceback.
"""
from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .config import Choice

__all__ = ["EVAL_NAME", "RESULT_NAME", "EvalActions", "evaluation_paths", "write_json_atomic", "report_evaluation",
           "draw_picture", "note", "run_episodes", "pool_episodes", "recheck_rounds", "recheck", "confirm_final_and_best"]

EVAL_NAME = "eval.json"
RESULT_NAME = "result.json"  # the end-of-run re-score of the final weights and best.pt, naming the better
DEFAULT_CHECKPOINT = "checkpoint.pt"
T = TypeVar("T")


class EvalActions(Choice):
    """How an evaluation picks its actions (``eval.actions``).

    ``mode``: the actor's most likely action (the mean for continuous actions), TorchRL's
    ``ExplorationType.DETERMINISTIC``. ``sample``: drawn from the actor's distribution, as in training
    (``ExplorationType.RANDOM``); DreamerV3's reference code evaluates this way. A policy trained with
    sampled actions can rely on mixing them (fire the engine on a third of the steps), which its mode
    never does.
    """

    mode = "mode"
    sample = "sample"


def evaluation_paths(target: str | os.PathLike) -> tuple[Path, Path, str]:
    """``--evaluate`` argument -> ``(run_dir, checkpoint_file, suffix)``.

    ``target`` is a run directory (its ``checkpoint.pt``) or a checkpoint file in one (e.g.
    ``<run>/best.pt``). ``suffix`` is ``""`` for the run's ``checkpoint.pt`` and ``"_<stem>"`` for
    any other file, so that scoring ``best.pt`` writes ``eval_best.json`` beside ``eval.json``
    instead of overwriting it."""
    target = Path(target)
    if target.is_dir():
        return target, target / DEFAULT_CHECKPOINT, ""
    suffix = "" if target.name == DEFAULT_CHECKPOINT else f"_{target.stem}"
    return target.parent, target, suffix


def write_json_atomic(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Writes ``record`` as JSON to a temporary file beside ``path``, then renames it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _why(exc: OSError) -> str:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the run directory is not writable ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def note(message: str) -> None:
    """One line on stderr."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def report_evaluation(record: Mapping[str, Any], run_dir: str | os.PathLike, filename: str = EVAL_NAME) -> Path | None:
    """Prints ``record`` as one JSON line (stdout), then writes it to ``run_dir/filename``.

    Returns the written path, or None (with a note on stderr) when the run directory cannot be
    written: the printed line is then the only copy, and it is complete."""
    print(json.dumps(record), flush=True)
    path = Path(run_dir) / filename
    try:
        return write_json_atomic(path, record)
    except OSError as exc:
        note(f"{filename} not written: {_why(exc)}; the JSON line above has the numbers")
        return None


def draw_picture(name: str, draw: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``draw(*args, **kwargs)`` for the picture ``name``; a failure (an unwritable run directory or
    anything else) becomes a one-line note on stderr instead of a traceback: the numbers were saved
    before any picture is drawn, and a picture must never hide them."""
    try:
        return draw(*args, **kwargs)
    except OSError as exc:
        note(f"{name} not drawn: {_why(exc)}")
    except Exception as exc:  # noqa: BLE001 - plotting must never hide the outcome
        note(f"{name} not drawn: {type(exc).__name__}: {exc}")
    return None


def run_episodes(policy, env, *, max_steps: int = 100_000, actions: str = "mode",
                 seed: int | None = None) -> dict[str, float]:
    """One episode per env of ``env`` (run in parallel), for any TorchRL policy (Dreamer's or PPO's),
    with the actor's mode actions or sampled ones (``actions``, see :class:`EvalActions`). With
    ``seed``, the episodes draw from torch's generators forked and seeded with it, so the caller's
    random stream is left where it was; without, from the caller's stream. Returns the
    mean episode reward SUM (``env`` must carry an ``episode_reward`` sum, e.g.
    :class:`~torchrl_dreamer.transforms.EpisodeRewardSum`) and length over those episodes. A policy
    with ``random_actions`` (Dreamer's prefill switch) acts with its actor here."""
    import torch

    try:
        actions = EvalActions(actions)
    except ValueError:
        raise ValueError(f"actions must be one of {', '.join(EvalActions.values())}; got {actions!r}") from None
    if seed is None:
        with torch.no_grad():
            return _run_episodes(policy, env, max_steps, actions)
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        return _run_episodes(policy, env, max_steps, actions)


def _run_episodes(policy, env, max_steps: int, actions: EvalActions) -> dict[str, float]:
    import torch
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    n = max(1, env.batch_size.numel())
    returns = torch.full((n,), float("nan"))
    lengths = torch.zeros(n)
    finished = torch.zeros(n, dtype=torch.bool)
    was_random = getattr(policy, "random_actions", None)
    if was_random is not None:
        policy.random_actions = False
    device = next(policy.parameters()).device  # the env stays on the CPU; the policy may be on cfg.device
    td = env.reset()
    env_device = env.device if env.device is not None else td.get("done").device  # custom envs may say None
    move = torch.device(env_device) != device  # on one device, no per-step copies
    kind = ExplorationType.RANDOM if actions == EvalActions.sample else ExplorationType.DETERMINISTIC
    with set_exploration_type(kind):
        for _ in range(max_steps):
            td = policy(td.to(device)).to(env_device) if move else policy(td)
            td, td_next = env.step_and_maybe_reset(td)
            done = td["next", "done"].reshape(n)
            lengths += (~finished).float()
            new = done & ~finished
            returns[new] = td["next", "episode_reward"].reshape(n)[new].float()
            finished |= done
            if bool(finished.all()):
                break
            td = td_next
    if was_random is not None:
        policy.random_actions = was_random
    return {"eval/episode_reward_sum": returns[finished].mean().item(), "eval/episode_length": lengths.mean().item(),
            "eval/episodes": float(finished.sum())}


def pool_episodes(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One result from several :func:`run_episodes` results: the mean episode reward sum and length
    over all their finished episodes together (each weighted by its ``eval/episodes``); NaN when
    none finished."""
    n = sum(float(r["eval/episodes"]) for r in results)
    if n == 0:
        return {"eval/episode_reward_sum": math.nan, "eval/episode_length": math.nan, "eval/episodes": 0.0}
    mean = lambda key: sum(float(r[key]) * float(r["eval/episodes"]) for r in results if r["eval/episodes"]) / n
    return {"eval/episode_reward_sum": mean("eval/episode_reward_sum"),
            "eval/episode_length": mean("eval/episode_length"), "eval/episodes": n}


def recheck_rounds(recheck_episodes: int, episodes_per_round: int) -> int:
    """How many more evaluations of ``episodes_per_round`` episodes (one per env of the evaluation
    env) play at least ``recheck_episodes`` more episodes (``eval.recheck_episodes``)."""
    return -(-max(recheck_episodes, 0) // max(episodes_per_round, 1))


def recheck(first: Mapping[str, float], play: Callable[[int], Mapping[str, float]], *, episodes: int,
            per_round: int) -> dict[str, float]:
    """``eval.recheck_episodes``: plays ``play(0)``, ``play(1)``, ... (each one evaluation of ``per_round``
    episodes with the weights behind ``first``) until at least ``episodes`` more have been played, and
    returns the pool of ``first`` and those as ``eval/recheck_episode_reward_sum``,
    ``eval/recheck_episode_length`` and ``eval/recheck_episodes``."""
    pooled = pool_episodes([first, *(play(i) for i in range(recheck_rounds(episodes, per_round)))])
    return {f"eval/recheck_{key[len('eval/'):]}": value for key, value in pooled.items()}


def confirm_final_and_best(run_dir: str | os.PathLike, *, episodes: int, seed: int, make_env: Callable[[], Any],
                           evaluate: Callable[[Any], Mapping[str, float]], networks: Any, final_env_steps: int,
                           best_file: str | os.PathLike | None, load_best: Callable[[dict], None],
                           checkpoint_name: str = DEFAULT_CHECKPOINT, device: Any = "cpu",
                           also: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The end of a run: scores the final weights and, if ``best_file`` exists, the weights behind the
    run's best evaluation on the same ``episodes`` fresh episodes (``make_env()`` builds them,
    ``evaluate(env)`` plays one episode per env and returns ``eval/episode_reward_sum`` and
    ``eval/episode_length``; torch and the env are seeded with ``seed`` before each), writes
    ``<run>/result.json`` naming the better file and prints one line. A run's last policy is not always
    its best, and a best-of-many 10-episode score flatters the policy behind it: this record is the
    run's result. ``load_best(state)`` loads ``best_file``'s checkpoint into ``networks``; the final
    weights are put back afterwards. ``also`` maps names to further ``networks`` state dicts scored on
    the same episodes for the record only (e.g. ``final_last``: the last iterate of a run whose
    final weights are a weight average); they are not candidates for ``use``."""
    import torch

    from .checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    env = make_env()
    final_weights = {k: v.detach().clone() for k, v in networks.state_dict().items()}
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []

    def score() -> dict[str, float]:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            env.set_seed(seed)
            m = evaluate(env)
        return {"episode_reward_sum": m["eval/episode_reward_sum"], "episode_length": m["eval/episode_length"]}

    try:
        record: dict[str, Any] = {"run_dir": str(run_dir), "episodes": episodes, "seed": seed,
                                  "final": {"file": checkpoint_name, "env_steps": final_env_steps, **score()}}
        for name, weights in (also or {}).items():
            networks.load_state_dict(weights)
            try:
                record[name] = {"file": checkpoint_name, "env_steps": final_env_steps, **score()}
            finally:
                networks.load_state_dict(final_weights)
        best = Path(best_file) if best_file is not None else None
        if best is not None and best.exists():
            state = load_checkpoint(best, map_location=device)
            load_best(state)
            try:
                record["best"] = {"file": best.name, "env_steps": state["env_steps"],
                                  "eval_when_saved": state.get("eval/episode_reward_sum"), **score()}
            finally:
                networks.load_state_dict(final_weights)
    finally:
        env.close(raise_if_closed=False)
    candidates = [record[k] for k in ("final", "best") if k in record]
    use = max(candidates, key=lambda c: c["episode_reward_sum"] if math.isfinite(c["episode_reward_sum"]) else -math.inf)
    record["use"] = use["file"]
    write_json_atomic(run_dir / RESULT_NAME, record)
    line = f"confirmed on {episodes} fresh episodes: final weights {record['final']['episode_reward_sum']:.1f}"
    line += "".join(f" ({name} {record[name]['episode_reward_sum']:.1f})" for name in (also or {}))
    if "best" in record:
        b = record["best"]
        when = f"eval {b['eval_when_saved']:.1f} at " if b["eval_when_saved"] is not None else ""
        line += f", {b['file']} ({when}{b['env_steps']:,} env steps) {b['episode_reward_sum']:.1f}"
    print(f"{line} -> use {run_dir / use['file']} ({RESULT_NAME})", flush=True)
    return record
