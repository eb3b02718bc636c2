"""Thread and allocator policy: how many intra-op threads torch gets for which kind of work,
and how freed memory is kept for reuse.

Per-pair work (one pair's LAP scores, an STE optimisation, activation statistics) multiplies
matrices of a few dozen rows: a second thread saves nothing, and while another process holds
a core torch's OpenMP workers spin-wait for it. On the 2-core machine of issue 14, weight
matching went from 12 ms to 23 ms per pair beside one busy process with 2 threads, and stayed
at 8-12 ms with 1. So per-pair loops run inside `per_pair()`, on `pair_threads` (1) threads.
Batched work (zoo and DEEP-ALIGN training, Sinkhorn re-basin and STE over many pairs,
interpolation and curve evaluation over many networks) uses the cores its process was given:
all of them in a stage's own process (a one-thread evaluate stage took 71 s against 31 s),
`cores / workers` in each worker process of a fanning-out stage (`threads_for`). Two worker
processes of one thread beat one of two threads on 2 cores (batched CNN training: 1.32x the
throughput), and two Python threads of small tensor ops contend for the GIL (weight matching
took 0.043 s per pair beside a Sinkhorn task, 0.0095 s alone), hence processes, not threads.

`OMP_NUM_THREADS`, when set, is the number of cores this process may use.

Allocator: glibc returns every freed block above its mmap threshold (128 KiB at first, raised
as large blocks are freed) to the kernel, so a training step that allocates and frees tens of
MB of activations page-faults them in again on every step. `keep_freed_memory` raises the
threshold to glibc's maximum (32 MiB) and keeps up to 1 GiB of freed memory for reuse: on the
2-core machine of issue 14 a batched step of 100 digits CNNs went from 4.0 s to 2.6-3.0 s per
epoch, MLPs from 0.59 to 0.56 s. Dask starts its workers with `MALLOC_TRIM_THRESHOLD_=65536`,
which fixes the threshold at 128 KiB and trims after every free: 100 MLPs then took 1.42 s per
epoch against 0.70 s, the measured cause of the slow Dask zoo. `ALLOCATOR_ENV` is the same
setting as environment variables, for processes started by others (Dask workers).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def available_cores() -> int:
    """Cores this process may use: OMP_NUM_THREADS when set, else its CPU affinity."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for(workers: int, threads: int = 0) -> int:
    """Intra-op threads of each of `workers` parallel tasks: `threads`, or with 0 the
    available cores split among the workers (at least 1)."""
    return threads or max(1, available_cores() // workers)


_policy = {"pair_threads": 1}


def set_pair_threads(n: int) -> None:
    """The intra-op threads of per-pair loops in this process (`runner.pair_threads`)."""
    _policy["pair_threads"] = n


@contextmanager
def per_pair() -> Iterator[None]:
    """A block of per-pair work: torch's threads lowered to the pair threads (never raised)."""
    with threads(min(_policy["pair_threads"], torch.get_num_threads())):
        yield


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to `n` inside the block (the process's own setting after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def configure_process(n_threads: int, pair_threads: int) -> None:
    """This process's policy: torch's intra-op threads, the per-pair threads, kept memory
    (stage processes, and each worker process of a process pool)."""
    torch.set_num_threads(n_threads)
    set_pair_threads(pair_threads)
    keep_freed_memory()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's largest mmap threshold on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # bytes of freed memory kept before any is returned to the kernel
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse in this process (see the
    module docstring); False where the C library has no `mallopt` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
