"""Running nmsparse's parallel numba kernels next to torch's own thread pool.

Two OpenMP runtimes live in one process: torch's (bundled with it) and the one numba's ``omp``
threading layer loads. After each parallel region an OpenMP worker spins on its core for a while
before it sleeps (libgomp's default), so a numba kernel called right after a torch operator shares
its cores with torch's spinning workers, and the other way round. With 2 cores that can halve the
speed of both. :func:`run` therefore starts numba's pool with ``OMP_WAIT_POLICY=PASSIVE`` (its
workers sleep as soon as a kernel ends; torch's runtime, already loaded, is not affected), unless
the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` themselves, and runs every kernel on torch's
current thread count, restoring that count if numba's pool start changed it.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numba
import torch

_started = False
_lock = threading.Lock()


def start_pool() -> None:
    """Start numba's worker pool (once) with a passive wait policy unless the user chose one."""
    global _started
    if _started:
        return
    with _lock:
        if _started:
            return
        from numba.np.ufunc import parallel

        torch_threads = torch.get_num_threads()
        user_set = any(v in os.environ for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
        if not user_set:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            parallel._launch_threads()
        finally:
            if not user_set:
                os.environ.pop("OMP_WAIT_POLICY", None)
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
        _started = True


def run(kernel: Callable[..., Any], *args: Any) -> Any:
    """Call a ``parallel=True`` numba kernel on torch's thread count (capped by numba's pool size).

    numba's OpenMP pool, when it starts, sets the process-wide OpenMP thread count to its own; torch's
    count is restored after the call so the caller never sees it change."""
    start_pool()
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    try:
        return kernel(*args)
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
