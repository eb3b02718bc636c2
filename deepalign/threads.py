"""Thread policy: how many intra-op threads torch gets for which kind of work.

Per-pair work (aligning one pair: LAP scores, a Sinkhorn or STE optimisation) multiplies
matrices of a few dozen rows: a second thread saves nothing, and while another process holds
a core torch's OpenMP workers spin-wait for it. On the 2-core machine of issue 14, weight
matching went from 12 ms to 23 ms per pair beside one busy process with 2 threads, and stayed
at 8-12 ms with 1; a Sinkhorn pair went from 1.3 s to 5.9 s with 2 threads, 0.75-1.0 s with 1.
So per-pair work runs on `pair_threads` (1) threads, with more pairs side by side as tasks.
Batched work (zoo and DEEP-ALIGN training, interpolation and curve evaluation over many
networks) runs one task at a time on all the cores: there a second thread pays (a
one-thread evaluate stage took 71 s against 31 s), and two Python threads of small tensor
ops contend for the GIL. Dask workers are processes: each gets cores / workers threads.

`OMP_NUM_THREADS`, when set, is the number of cores this process may use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

Work = Literal["batched", "pairs"]


def available_cores() -> int:
    """Cores this process may use: OMP_NUM_THREADS when set, else its CPU affinity."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for(work: Work, workers: int, threads: int = 0, pair_threads: int = 1) -> int:
    """Intra-op threads of each of `workers` parallel tasks doing `work`.

    `threads` (batched work) 0 means the available cores split among the workers.
    """
    if work == "pairs":
        return pair_threads
    return threads or max(1, available_cores() // workers)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to `n` inside the block (the process's own setting after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
