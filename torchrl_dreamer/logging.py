"""Run directories and the one logger that feeds TensorBoard, ``metrics.jsonl`` and tqdm.

Metric names are namespaced: ``train/``, ``eval/``, ``loss/``, ``time/``, ``diag/``. A name
outside these namespaces is a programming error and raises at the first ``log`` call, so a typo
never silently creates a new curve.
"""
from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["NAMESPACES", "make_run_dir", "RunLogger"]

NAMESPACES = ("train/", "eval/", "loss/", "time/", "diag/")


def make_run_dir(root: str | os.PathLike, recipe: str, env_name: str) -> Path:
    """Creates ``<root>/<recipe>/<env_name>/<timestamp>/`` (a suffix keeps names unique)."""
    base = Path(root) / recipe / env_name.replace("/", "_")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {base}")


def _tensorboard_logger(run_dir: Path, purge_step: int | None):
    """TorchRL's ``TensorboardLogger`` writing to ``run_dir/tensorboard``, with ``purge_step``."""
    from torchrl.record.loggers.tensorboard import TensorboardLogger

    class _Logger(TensorboardLogger):
        def _create_experiment(self):
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=os.path.join(self.log_dir, self.exp_name), purge_step=purge_step)

    return _Logger(exp_name="tensorboard", log_dir=str(run_dir))


class RunLogger:
    """Writes scalars to TensorBoard (TorchRL's ``TensorboardLogger``), ``metrics.jsonl`` and a tqdm bar.

    Args:
        run_dir: the run directory; TensorBoard events go to ``run_dir/tensorboard``.
        total: length of the progress bar (e.g. iterations or env steps); ``None`` disables the bar.
        unit: progress-bar unit.
        postfix_keys: metric names shown in the bar's postfix, or a mapping name -> label.
        tensorboard: write TensorBoard events.
        progress: show the tqdm bar (off in tests / non-interactive runs if desired).
        initial: starting position of the bar (resume).
        purge_step: on resume, the first step after the restored checkpoint: TensorBoard hides the
            events at and after it that an interrupted process wrote (``SummaryWriter(purge_step=...)``),
            as ``metrics.jsonl`` drops those rows, so no curve shows a step twice.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total: int | None = None,
        unit: str = "it",
        postfix_keys: Sequence[str] | Mapping[str, str] = (),
        tensorboard: bool = True,
        progress: bool = True,
        initial: int = 0,
        purge_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            self._tb = _tensorboard_logger(self.run_dir, purge_step)
        if isinstance(postfix_keys, Mapping):
            self._postfix = dict(postfix_keys)
        else:
            self._postfix = {name: name.replace("/", ".") for name in postfix_keys}
        self._bar = None
        if progress and total is not None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)
        self._start = time.time()

    @staticmethod
    def _check_names(metrics: Mapping[str, float]) -> None:
        for name in metrics:
            if not name.startswith(NAMESPACES):
                raise ValueError(
                    f"metric '{name}' is not namespaced; names start with one of {NAMESPACES}"
                )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs scalars at ``step`` (env frames for RL recipes). Non-finite values are kept as
        ``NaN``/``inf`` in JSON (as strings) so they show up instead of vanishing."""
        self._check_names(metrics)
        record: dict[str, object] = {"step": int(step), "wall_time": round(time.time() - self._start, 3)}
        for name, value in metrics.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            if self._tb is not None:
                self._tb.log_scalar(name, value, step=step)
        self._jsonl.write(json.dumps(record) + "\n")
        if self._bar is not None:
            shown = {
                label: f"{float(metrics[name]):.3g}" for name, label in self._postfix.items() if name in metrics
            }
            if shown:
                self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        """Prints a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.experiment.flush()
            self._tb.experiment.close()
            self._tb = None
        if not self._jsonl.closed:
            self._jsonl.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
