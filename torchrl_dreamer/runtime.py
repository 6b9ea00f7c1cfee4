"""What every recipe's command line shares around training: the run directory's lock, the clean-up
a crash may leave for ``--resume``, device checks, and turning expected failures into one line.

Order of a recipe's ``main`` (nothing is created or changed before the last two steps):

1. parse and validate the whole config (:mod:`.config`), check the device (:func:`check_device`);
2. read the resume state (:func:`.checkpoint.load_resume_state`, read-only) and build what can fail
   (env factory, model shapes against that state);
3. :func:`open_run_dir`: create the run directory (or take the existing one for ``--resume``),
   lock it, clean what a crash left (stale temporary files, ``metrics.jsonl`` rows logged after
   the restored checkpoint), then write the resolved ``config.yaml``;
4. train.

Exit codes of :func:`run_cli`: 0 success, 2 a problem the user fixes (config, files, device, env
contract, a locked run directory, a full or read-only disk), 3 training stopped by the non-finite
guard, 130 interrupted. ``TORCHRL_DREAMER_TRACEBACK=1`` prints the traceback too.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig

from .config import ConfigError, save_config
from .guards import NonFiniteError
from .logging import make_run_dir

__all__ = [
    "EXIT_INPUT", "EXIT_RUNTIME", "LOCK_NAME", "RunLockedError", "RunLock", "check_device", "clean_after_crash",
    "open_run_dir", "run_cli",
]

EXIT_INPUT = 2
EXIT_RUNTIME = 3
LOCK_NAME = ".lock"
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}


class RunLockedError(ConfigError):
    """Another live process is writing this run directory."""


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device`` that exists here, or a :class:`ConfigError` saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device: '{device}' is not a torch device string; use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} but CUDA is not available here (torch {torch.__version__}); "
                              "use device=cpu or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device={device} but MPS is not available here; use device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(1, device=dev)
        except Exception:
            raise ConfigError(f"device={device} cannot hold tensors here; use device=cpu") from None
    return dev


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """``<run>/.lock`` holding ``"<pid> <host>"``: one writer per run directory. A lock left by a
    process that no longer runs (on this host) is taken over with a note on stderr."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _owner(self) -> tuple[int | None, str]:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
            return int(pid), host
        except (OSError, ValueError):
            return None, ""

    def acquire(self) -> "RunLock":
        payload = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._owner()
                same_host = host in ("", socket.gethostname())
                if pid is not None and pid != os.getpid() and (not same_host or _pid_alive(pid)):
                    where = "" if same_host else f" on host {host}"
                    raise RunLockedError(f"{self.path.parent} is in use by process {pid}{where} (lock file {self.path}); "
                                         "wait for it to end, or delete the lock file if that process is gone") from None
                print(f"note: taking over the lock {self.path} left by process {pid}, which is no longer running",
                      file=sys.stderr, flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
            self.held = True
            atexit.register(self.release)
            return self
        raise RunLockedError(f"could not take the lock {self.path}: another process keeps taking it")

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._owner()[0] == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def clean_after_crash(run_dir: str | os.PathLike, last_step: int | None) -> list[str]:
    """Makes a run directory consistent with the checkpoint it resumes from: removes temporary
    files of interrupted writes (``*.tmp-*``, ``*.tmp``) and drops the ``metrics.jsonl`` rows logged
    after ``last_step`` (the restored checkpoint's logger step; they are logged again as training
    repeats them) and any torn last line. Returns one note per thing it did."""
    run_dir = Path(run_dir)
    notes = []
    for tmp in sorted({*run_dir.glob(".*.tmp-*"), *run_dir.glob("*.tmp-*"), *run_dir.glob("*.tmp")}):
        if tmp.is_file():
            tmp.unlink()
            notes.append(f"removed {tmp.name} (left by an interrupted write)")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        kept, dropped, torn = [], 0, 0
        for line in metrics.read_text().splitlines():
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if last_step is not None and step > last_step:
                dropped += 1
                continue
            kept.append(line)
        if dropped or torn:
            tmp = metrics.with_name(f".{metrics.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, metrics)
            notes.append(f"metrics.jsonl: dropped {dropped} row(s) logged after step {last_step} of the checkpoint"
                         + (f" and {torn} unreadable line(s)" if torn else ""))
    return notes


def open_run_dir(
    config: DictConfig, *, root: str, recipe: str, name: str, resume: Path | None = None,
    last_step: int | None = None,
) -> tuple[Path, RunLock]:
    """The run directory to train in, locked, consistent and with its ``config.yaml`` written.

    A new run gets ``<root>/<recipe>/<name>/<timestamp>/``. For ``--resume`` (``resume`` set) call
    this only after the resume state has loaded and the model accepted it: it then cleans what a
    crash left (:func:`clean_after_crash` with the checkpoint's ``last_step``) and rewrites
    ``config.yaml`` with the overrides of this invocation."""
    if resume is None:
        try:
            run_dir = make_run_dir(root, recipe, name)
        except OSError as exc:
            raise ConfigError(f"run.root: cannot create a run directory under {root} ({exc.strerror or exc}); "
                              "set run.root to a writable directory") from None
        lock = RunLock(run_dir).acquire()
    else:
        run_dir = Path(resume)
        lock = RunLock(run_dir).acquire()
        for note in clean_after_crash(run_dir, last_step):
            print(f"note: {note}", file=sys.stderr, flush=True)
    try:
        save_config(config, run_dir / "config.yaml")
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def _describe_os_error(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space or point run.root at another disk; the last checkpoint is intact"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "make it writable or point run.root at a writable directory"
    else:
        hint = "check the disk"
    return f"cannot write{where}: {what}; {hint}"


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Runs a recipe's ``main`` as a command: expected failures become one ``error: ...`` line on
    stderr and an exit code (see the module docstring); anything else is a bug and keeps its
    traceback."""
    from .collectors import WorkerFailedError

    show_traceback = os.environ.get("TORCHRL_DREAMER_TRACEBACK", "") not in ("", "0")
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (continue with --resume <run dir>)", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        if show_traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except (NonFiniteError, WorkerFailedError) as exc:
        if show_traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME)
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        if show_traceback:
            traceback.print_exc()
        print(f"error: {_describe_os_error(exc)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
