"""How much memory this process may use: what the machine has available, and the memory limit of the cgroup
it runs in (v1 or v2, as containers, systemd and the larger-than-RAM benchmark set it), whichever is less.

A cgroup's limit counts the page cache the process causes; the part of it the kernel can drop at once
(inactive file pages) is counted as available, as the kernel's own `MemAvailable` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

NO_LIMIT = 1 << 60  # v1 writes "no limit" as a page-rounded 2^63 - 1


@dataclass(frozen=True)
class HostMemory:
    available_bytes: int  # what this process may still use
    machine_available_bytes: int  # psutil's available memory of the whole machine
    limit_bytes: int | None  # the tightest cgroup limit above this process, if any

    @property
    def limited_by_cgroup(self) -> bool:
        return self.limit_bytes is not None and self.available_bytes < self.machine_available_bytes


def host_memory(root: Path = Path("/"), machine_available: int | None = None) -> HostMemory:
    """`root`: where /proc and /sys are (a test points it at a made-up tree)."""
    machine = psutil.virtual_memory().available if machine_available is None else machine_available
    limit = cgroup_limit(root)
    if limit is None:
        return HostMemory(machine, machine, None)
    limit_bytes, used = limit
    return HostMemory(max(0, min(machine, limit_bytes - used)), machine, limit_bytes)


def cgroup_limit(root: Path = Path("/")) -> tuple[int, int] | None:
    """(limit, bytes in use less the droppable page cache) of the tightest memory limit on this process's cgroup
    or its ancestors, or None where there is none (or no cgroup file system to read)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: "0::/path"
            found += _limits(root / "sys/fs/cgroup", path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: "N:memory:/path"
            found += _limits(root / "sys/fs/cgroup/memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                             "total_inactive_file")
    return min(found, key=lambda f: f[0] - f[1]) if found else None


def _limits(mount: Path, path: str, limit_file: str, usage_file: str, inactive_key: str) -> list[tuple[int, int]]:
    """The limits of the cgroup at `path` and its ancestors under `mount`. Inside a container /proc/self/cgroup
    may name the host's path while the container sees its own cgroup at the mount's root: try both."""
    out = []
    relative = Path(path.lstrip("/"))
    candidates = [mount / relative] if str(relative) not in ("", ".") else []
    candidates.append(mount)
    seen = set()
    for start in candidates:
        if not start.is_dir():
            continue
        here = start
        while True:
            if here not in seen:
                seen.add(here)
                limit = _number(here / limit_file)
                usage = _number(here / usage_file)
                if limit is not None and limit < NO_LIMIT and usage is not None:
                    out.append((limit, max(0, usage - _stat(here / "memory.stat", inactive_key))))
            if here == mount or here.parent == here:
                break
            here = here.parent
        break  # the first candidate that exists is this process's cgroup
    return out


def _number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return NO_LIMIT
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
