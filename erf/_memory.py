"""Memory a CPU run may use: the host's available RAM, capped by the container's cgroup limit.

A container (Docker, Kubernetes, SLURM with cgroups) kills a process that exceeds its memory
limit with SIGKILL (exit 137, no message), however much RAM the host has free; so the limit
minus the current usage is what a batch may use. cgroup v2: ``memory.max`` / ``memory.current``;
v1: ``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` (page cache counted in the usage is
reclaimable: ``total_inactive_file`` / ``inactive_file`` of ``memory.stat`` is subtracted).
"""
from __future__ import annotations

import os

#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages)
_UNLIMITED = 1 << 60


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _inactive_file(path: str, keys: tuple[str, ...]) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name in keys:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_cgroups(proc: str) -> tuple[str | None, str | None]:
    """This process's cgroup path for v2 (``0::/path``) and for v1's memory controller."""
    v2 = v1 = None
    try:
        with open(proc) as fh:
            for line in fh:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) != 3:
                    continue
                if parts[0] == "0" and parts[1] == "":
                    v2 = parts[2]
                elif "memory" in parts[1].split(","):
                    v1 = parts[2]
    except OSError:
        pass
    return v2, v1


def cgroup_available(root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or ``None`` when no limit is set.

    The tightest limit among the process's cgroup and its ancestors counts (v2 limits nest)."""
    v2, v1 = _own_cgroups(proc)
    best: int | None = None

    def consider(limit: int | None, usage: int | None, stat: str, keys: tuple[str, ...]) -> None:
        nonlocal best
        if limit is None:
            return
        used = max(0, (usage or 0) - _inactive_file(stat, keys))
        left = max(0, limit - used)
        best = left if best is None else min(best, left)

    if v2 is not None:
        rel = v2.strip("/")
        parts = rel.split("/") if rel else []
        for i in range(len(parts), -1, -1):  # own cgroup and its ancestors (a container sees its own as /)
            d = os.path.join(root, *parts[:i])
            if os.path.isfile(os.path.join(d, "memory.max")):
                consider(_read_int(os.path.join(d, "memory.max")), _read_int(os.path.join(d, "memory.current")),
                         os.path.join(d, "memory.stat"), ("inactive_file",))
    for base in (os.path.join(root, "memory"), root):  # v1: the memory controller's hierarchy
        candidates = [base]
        if v1 is not None and v1.strip("/"):
            candidates.insert(0, os.path.join(base, v1.strip("/")))
        for d in candidates:
            limit_path = os.path.join(d, "memory.limit_in_bytes")
            if os.path.isfile(limit_path):
                consider(_read_int(limit_path), _read_int(os.path.join(d, "memory.usage_in_bytes")),
                         os.path.join(d, "memory.stat"), ("total_inactive_file", "inactive_file"))
                break
        else:
            continue
        break
    return best


def host_available(meminfo: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where it cannot be read)."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_available() -> int:
    """Memory a CPU run may use: min(host ``MemAvailable``, what the cgroup limit leaves); 4 GiB if unknown."""
    values = [v for v in (host_available(), cgroup_available()) if v is not None]
    return min(values) if values else 4 << 30


def describe(nbytes: float) -> str:
    """``1.5 GiB`` style."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"
