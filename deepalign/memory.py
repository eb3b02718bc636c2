"""Memory estimates before large allocations: a clear error instead of the allocator's.

What a process may still allocate is the least of the memory the kernel reports available,
the room left under its address-space limit (`ulimit -v`) and the room left in its cgroup.
"""

from __future__ import annotations

import resource
from pathlib import Path

from deepalign.errors import DeepAlignError


def _meminfo(key: str) -> int | None:
    """A /proc/meminfo value in bytes (None where there is no such file or key)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    """Bytes left under RLIMIT_AS, or None without a limit."""
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, limit - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return limit
    return limit


def _cgroup_left() -> int | None:
    """Bytes left in this process's cgroup (v2), or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """What this process may still allocate, or None where nothing says."""
    known = [b for b in (_meminfo("MemAvailable"), _address_space_left(), _cgroup_left()) if b]
    return min(known) if known else None


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(nbytes: int, what: str) -> None:
    """Refuse an allocation of `nbytes` that cannot fit, naming `what` needs it."""
    free = available_bytes()
    if free is not None and nbytes > free:
        raise DeepAlignError(
            f"{what} needs ~{gigabytes(nbytes)} of memory, but only {gigabytes(free)} is free"
        )
