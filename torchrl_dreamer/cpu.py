"""CPU-side process settings that recipes apply at start-up (never at import time).

:func:`tune_malloc` keeps freed memory inside the process instead of handing it back to the OS.
glibc's defaults ``mmap`` every allocation above 128 KiB and ``munmap`` it on free, so each
medium-sized tensor (an imagined batch of features, a two-hot logit block) is paid again in page
faults every update; the autograd engine's allocations also spread over several arenas. Measured on
this project's 2-core machine: the backward of an elementwise op on a 16384 x 64 tensor
2.9 ms -> 0.6 ms, and a full Dreamer update at 16x64 with 1024 imagined starts 2.67 -> 3.36
updates/s (2 threads). Memory use grows to the peak working set and stays there, which is what a
training process wants.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch

__all__ = ["tune_malloc", "compile_unavailable", "minor_page_faults"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


def tune_malloc() -> bool:
    """Applies the glibc ``mallopt`` settings above; returns False (and does nothing) where glibc
    is not the allocator (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 28))
    return all(mallopt(option, value) == 1 for option, value in settings)


def minor_page_faults() -> int:
    """Minor page faults of this process so far (``getrusage``): what the benchmarks report per
    update or iteration to show whether the allocator treats two interleaved workloads alike."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def compile_unavailable(device: str | torch.device = "cpu") -> str | None:
    """Why ``torch.compile`` cannot run here, or ``None`` when it can.

    Compiles and runs a two-op function on ``device`` (a few seconds on a cold cache). On CPU,
    inductor needs a working C++ compiler (and Python headers); without one the first compiled call
    raises deep inside training. Recipes call this first and fall back to eager with a warning."""
    try:
        fn = torch.compile(lambda x: torch.sigmoid(x) * 2 + 1, dynamic=False)
        fn(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure means "run eager"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def inductor_options(device: str | torch.device = "cpu", cpp_wrapper: bool = True) -> dict:
    """``torch.compile`` keyword arguments for the Dreamer update graphs on ``device``.

    On CPU (and with ``cpp_wrapper``) inductor writes each graph's host code (the calls of its
    kernels and matmuls, buffer views and size checks) in C++ instead of Python. The Dreamer graphs
    are hundreds of small kernels and matmuls, so that Python cost is a few milliseconds per update
    (same-process A/B at the throughput benchmark's sizes: ~4% more updates/s). The cold compile
    is longer: 465 s against 257 s for the CartPole YAML's graphs, so short runs may do better
    without it. Elsewhere: no options (inductor's defaults)."""
    if cpp_wrapper and torch.device(device).type == "cpu":
        return {"options": {"cpp_wrapper": True}}
    return {}
