"""Threads for the world's generation: NumPy, SciPy's filters and GDAL work outside the GIL, so
the strips of one array can be computed on both cores at once.

Every task given here writes its own rows and draws no random numbers (the generators are drawn
from before, in order), so the world is the same byte for byte whatever ``WORKERS`` is.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Threads per task: the demo's budget is 2 cores, and each further thread holds one more
#: strip's temporaries (tens of MB) against the generator's 1 GB.
WORKERS = min(2, os.cpu_count() or 1)

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_malloc_arena() -> None:
    """Make every thread allocate from the process's one heap (glibc's ``M_ARENA_MAX`` = 1).

    glibc gives a thread its own heap ("arena") and keeps what is freed there for that thread:
    with strips painted on two threads the generator's peak went from 0.95 to 1.06-1.10 GB, with
    one arena it is 0.88 GB (``MALLOC_ARENA_MAX=1``, 2026-12-03). Nothing happens off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_ARENA_MAX, 1)


def in_threads(fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
    """``[fn(t) for t in tasks]``, computed by up to ``WORKERS`` threads (in order; errors raised)."""
    if WORKERS < 2 or len(tasks) < 2:
        return [fn(t) for t in tasks]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(fn, tasks))


def row_chunks(rows: int, parts: int | None = None) -> list[tuple[int, int]]:
    """``parts`` (default ``WORKERS``) contiguous, nearly equal row ranges covering ``0:rows``."""
    parts = WORKERS if parts is None else parts
    edges = [round(rows * k / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
