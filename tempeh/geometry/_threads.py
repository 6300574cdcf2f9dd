"""A shared worker pool for the GIL-releasing numba kernels of tempeh.geometry (closest-face
query, Embree ray casting), and dynamic splitting of an index range across its threads.

Why Python threads and not ``numba.prange``: numba's OpenMP threading layer kept its workers
spinning after a parallel region, which made torch's CPU kernels in the same process up to 20x
slower; a plain thread pool has no such side effect and needs no global threading-layer setting.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

__all__ = ["default_threads", "thread_pool", "run_ranges"]

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: Tuple[int, int] = (0, 0)
_POOL_LOCK = threading.Lock()


def default_threads() -> int:
    """torch's intra-op thread count (the CPU budget the rest of the process uses)."""
    try:
        import torch

        return torch.get_num_threads()
    except Exception:  # pragma: no cover
        return os.cpu_count() or 1


def thread_pool(n_workers: int) -> ThreadPoolExecutor:
    """A module-level pool of at least ``n_workers`` threads, recreated after a fork (the
    threads do not survive it) or when more workers are needed (the old pool is left to other
    callers that may still hold it; its idle threads cost nothing)."""
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        pid = os.getpid()
        if _POOL is None or _POOL_KEY[0] != pid or _POOL_KEY[1] < n_workers:
            _POOL = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="tempeh-geometry")
            _POOL_KEY = (pid, n_workers)
        return _POOL


def run_ranges(fn: Callable[[int, int, int], None], n: int, n_threads: int, align: int = 1,
               tasks_per_thread: int = 8) -> None:
    """Call ``fn(start, stop, t)`` over ``[0, n)`` split into ranges, on ``n_threads`` threads.

    The range is cut into ~``tasks_per_thread * n_threads`` pieces whose starts are multiples of
    ``align``; worker ``t`` (0 is the calling thread) claims pieces one after another until none
    is left. Dynamic claiming instead of one static piece per thread: a thread that shares its
    core with something else (e.g. torch's OpenMP worker still spinning after a backward pass)
    does less, instead of holding up the whole call. ``fn`` must release the GIL to run in
    parallel (numba ``nogil=True`` kernels do); ``t`` lets it use per-worker scratch.
    """
    if n <= 0:
        return
    units = -(-n // align)
    n_threads = max(1, min(n_threads, units))
    if n_threads == 1:
        fn(0, n, 0)
        return
    n_tasks = min(units, tasks_per_thread * n_threads)
    bounds = [min(n, (units * k // n_tasks) * align) for k in range(n_tasks + 1)]
    counter = itertools.count()
    lock = threading.Lock()

    def work(t: int) -> None:
        while True:
            with lock:
                k = next(counter)
            if k >= n_tasks:
                return
            fn(bounds[k], bounds[k + 1], t)

    futures = [thread_pool(n_threads - 1).submit(work, t) for t in range(1, n_threads)]
    try:
        work(0)
    finally:
        for fut in futures:
            fut.result()
