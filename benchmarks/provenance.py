"""What every benchmark JSON records about where its numbers come from: commit (and whether the
tree was dirty), library versions, CPU model and thread counts, the command line and the date."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    except OSError:
        return ""


def provenance(**extra: Any) -> dict[str, Any]:
    """The stamp (``extra`` adds benchmark-specific entries, e.g. the threads its runs use)."""
    import tensordict
    import torchrl

    # dirty = uncommitted changes to the code; result files written by earlier benchmarks do not count
    dirty = bool(_git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results").strip())
    return {"git_commit": _git("rev-parse", "HEAD").strip(), "git_dirty": dirty,
            "torch": torch.__version__, "torchrl": torchrl.__version__, "tensordict": tensordict.__version__,
            "python": platform.python_version(), "cpu": _cpu_model() or platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads_harness": torch.get_num_threads(), **extra,
            "argv": sys.argv, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


RESULTS = ROOT / "benchmarks" / "results"


def write_json(path: Path | str, record: Any, *, announce: bool = True) -> Path:
    """Writes ``record`` as JSON at ``path`` (folders made; a temporary file renamed into place, so an
    interrupted benchmark never leaves half a result) and, with ``announce``, prints where; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    if announce:
        print(f"wrote {path}")
    return path


def result_path(out: str | Path) -> Path:
    """Where a script's ``--out`` goes: a bare name is ``benchmarks/results/<name>.json``; a path
    (with a folder, absolute, or ending in ``.json``) is taken as it is, ``.json`` added if missing."""
    path = Path(out)
    if path.suffix != ".json":
        path = path.with_name(path.name + ".json")
    return path if (path.is_absolute() or len(path.parts) > 1 or str(out).endswith(".json")) else RESULTS / path


def write_result(out: str | Path, record: dict[str, Any]) -> Path:
    """Writes ``record`` to :func:`result_path` of ``out`` and prints where; returns the path."""
    return write_json(result_path(out), record)
